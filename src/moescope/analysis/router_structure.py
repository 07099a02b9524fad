"""Router weight structure: what the router matrices themselves say (needs the model's weights).

For each layer's router weight W [E, H] (row e scores expert e): per-expert L2 norm, mean, standard
deviation and variance of the row (ddof=1, as torch.std in the seed notebook), the cosine-similarity
matrix between rows, each expert's most similar other expert, and the most similar pairs. Not a streaming
analysis: it takes the matrices, e.g. {moe_layer: router.weight.float().numpy()}.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from moescope.analysis.kernels import jsonable
from moescope.errors import MoescopeError

NAME = "router_structure"


@dataclass(frozen=True, eq=False)
class RouterStructureResult:
    layers: tuple[int, ...]
    norm: np.ndarray  # float64 [L, E]
    mean: np.ndarray  # float64 [L, E]
    std: np.ndarray  # float64 [L, E] (ddof=1)
    cosine: np.ndarray  # float64 [L, E, E]
    top_n: int
    notes: tuple[str, ...] = ()

    def pairs(self) -> pd.DataFrame:
        """Every pair i < j per layer with its cosine similarity, most similar first within a layer."""
        L, E, _ = self.cosine.shape
        i, j = np.triu_indices(E, 1)
        df = pd.DataFrame(
            {
                "layer": np.repeat(self.layers, i.size),
                "expert_a": np.tile(i, L),
                "expert_b": np.tile(j, L),
                "cosine": self.cosine[:, i, j].ravel(),
            }
        )
        return df.sort_values(["layer", "cosine"], ascending=[True, False], kind="stable").reset_index(drop=True)

    def to_pandas(self) -> dict[str, pd.DataFrame]:
        L, E = self.norm.shape
        off = self.cosine.copy()
        off[:, np.arange(E), np.arange(E)] = -np.inf
        partner = off.argmax(axis=2)
        per_expert = pd.DataFrame(
            {
                "layer": np.repeat(self.layers, E),
                "expert": np.tile(np.arange(E), L),
                "norm": self.norm.ravel(),
                "mean": self.mean.ravel(),
                "std": self.std.ravel(),
                "variance": (self.std**2).ravel(),
                "most_similar": partner.ravel(),
                "most_similar_cosine": np.take_along_axis(off, partner[..., None], axis=2).ravel(),
            }
        )
        return {
            "per_expert": per_expert,
            "pairs": self.pairs(),
            "top_pairs": self.pairs().groupby("layer").head(self.top_n).reset_index(drop=True),
        }

    def summary(self) -> dict:
        E = self.norm.shape[1]
        i, j = np.triu_indices(E, 1)
        off = self.cosine[:, i, j]  # [L, pairs]
        top = self.pairs().sort_values("cosine", ascending=False, kind="stable").head(10)
        return jsonable(
            {
                "mean_offdiagonal_cosine": off.mean() if off.size else None,
                "max_offdiagonal_cosine": off.max() if off.size else None,
                "norm_cv": (self.norm.std(axis=1) / self.norm.mean(axis=1)).mean(),
                "most_similar_pairs": top.to_dict("records"),
            }
        )


def analyze_router_weights(router_weights: Mapping[int, np.ndarray], *, top_n: int = 20) -> RouterStructureResult:
    """Structure of router weight matrices {moe_layer: W [E, H]} (all layers must have the same E)."""
    if not router_weights:
        raise MoescopeError("no router weights given: router structure needs the model's router matrices")
    layers = tuple(sorted(router_weights))
    mats = [np.asarray(router_weights[l], dtype=np.float64) for l in layers]
    shapes = {m.shape for m in mats}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise MoescopeError(f"router weights must all be [E, H] matrices of one shape, got {sorted(shapes)}")
    W = np.stack(mats)  # [L, E, H]
    norm = np.linalg.norm(W, axis=2)  # [L, E]
    unit = W / np.where(norm > 0, norm, 1.0)[..., None]
    cosine = unit @ unit.transpose(0, 2, 1)  # [L, E, E]
    std = W.std(axis=2, ddof=1) if W.shape[2] > 1 else np.full(norm.shape, np.nan)
    notes = ("some router rows are all zero: their cosine similarity is 0",) if (norm == 0).any() else ()
    return RouterStructureResult(layers, norm, W.mean(axis=2), std, cosine, top_n, notes)
