"""AnalysisContext: the trace-wide facts and knobs every analysis reads (never per-shard data).

Analyses take `ShardData` plus this context, so they run on a trace read from disk, on a JSONL import
or on arrays a test builds by hand. `AnalysisContext.from_manifest` builds one from a trace manifest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moescope.errors import MoescopeError, TraceError

ROUTER_OUTPUT_KINDS = ("logits", "probs")  # "mixed" (layers disagree) is accepted but not usable
OVERALL = -1  # the `layer` value of rows that pool every layer


@dataclass(frozen=True)
class Thresholds:
    """Knobs of the analyses; every default is the one the seed notebooks use where they have one."""

    overloaded_factor: float = 1.5  # expert is overloaded when load > factor * expected load
    underused_factor: float = 0.5  # expert is under-used when load < factor * expected load
    dead_max_count: int = 0  # expert is dead when its load <= this many slots
    hist_bins: int = 50  # bins of every fixed-range histogram
    ratio_max: float = 1000.0  # top-1/top-2 weight-ratio histogram spans [1, ratio_max] (log bins)
    what_if_top_k: tuple[int, ...] = (1, 2, 4)  # alternative top-k routings to simulate from router outputs
    max_hop: int = 3  # cross-layer transitions from layer N to N+1 .. N+max_hop
    top_n: int = 20  # length of every "most ..." list (pairs, domain-specific experts)
    min_count: int = 20  # slots an expert needs before it can be called domain-specific
    min_token_count: int = 5  # occurrences a token needs to enter the vocabulary-specialisation summary
    domain_pair: tuple[str, str] = ("code", "math")  # the pair compared in detail when both are present
    large_expert_size: float | None = None  # None: midpoint of the smallest and largest size per layer
    token_table_cells: int = 1 << 22  # (token, layer, expert) cells of exact per-token counts ((token, layer,
    # combination) for small combination spaces): the most frequent tokens that fit (282 at 58 layers x 256
    # experts, 2,912 at 32 x 8 top-2's 45 combinations) keep them; the others keep occurrences

    def __post_init__(self) -> None:
        if self.max_hop < 1:
            raise MoescopeError(f"max_hop must be >= 1, got {self.max_hop}")
        if self.hist_bins < 1:
            raise MoescopeError(f"hist_bins must be >= 1, got {self.hist_bins}")


@dataclass(frozen=True, eq=False)
class AnalysisContext:
    """What analyses need to know about the trace as a whole.

    `expert_sizes` is int64 [n_layers, n_experts] (intermediate size of each expert); a 1-D [n_experts]
    array is broadcast to every layer. `hidden_size` and `expert_sizes` enable the cost analyses.
    `prefetch_table` (from `CrossLayerResult.prefetch_table()`) feeds the transition predictor of the
    expert-cache simulation; `run_analyses` fills it in itself when it can read the shards twice.
    `n_experts` counts routed experts (ids 0..n_experts-1); `non_compute_ids` are the router's other
    choices (LongCat's identity experts, ZAYA's skip; ids >= n_experts, of `non_compute_kinds`), which count
    toward no expert's load but are columns of the router output: it has `router_width` columns.
    """

    n_experts: int
    top_k: int
    n_layers: int
    router_output_kind: str | None = None  # "logits" | "probs" | "mixed" (unusable) | None (nothing captured)
    expert_sizes: np.ndarray | None = None  # int64 [L, E]
    hidden_size: int | None = None
    expert_matrices: int = 3  # weight matrices per expert: 3 for SwiGLU (gate, up, down), 2 for a plain MLP
    dense_intermediate_size: int | None = None  # per-layer dense-equivalent size; None: top_k * mean expert size
    vocab_size: int | None = None  # bound on token ids (tighter keys); None: any int32 id
    token_text: Callable[[int], str] | Mapping[int, str] | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    prefetch_table: Any = None  # PrefetchTable | None (see cross_layer.py)
    token_table: np.ndarray | None = None  # int64 sorted token ids whose expert counts token_specialisation keeps
    # (None: every token; run_analyses picks the most frequent in a first pass when it can read the shards twice)
    n_experts_inferred: bool = False  # imported without an expert count: n_experts is the largest id seen + 1
    non_compute_ids: tuple[int, ...] = ()  # router choices that are not experts: n_experts, n_experts + 1, ...
    non_compute_kinds: tuple[str, ...] = ()  # what they are: "identity", "skip"

    def __post_init__(self) -> None:
        if self.n_experts < 1 or self.top_k < 1 or self.n_layers < 1:
            raise MoescopeError(
                f"n_experts, top_k and n_layers must be positive, got {self.n_experts}, {self.top_k}, {self.n_layers}"
            )
        if tuple(self.non_compute_ids) != tuple(range(self.n_experts, self.n_experts + len(self.non_compute_ids))):
            raise MoescopeError(f"non-compute choices must have the ids right after the {self.n_experts} routed experts, "
                                f"got {list(self.non_compute_ids)}")
        if self.router_output_kind not in (None, "mixed", *ROUTER_OUTPUT_KINDS):
            raise MoescopeError(
                f"router_output_kind must be one of {ROUTER_OUTPUT_KINDS} or None, got {self.router_output_kind!r}"
            )
        if self.expert_sizes is not None:
            sizes = np.asarray(self.expert_sizes, dtype=np.int64)
            if sizes.ndim == 1:
                sizes = np.broadcast_to(sizes, (self.n_layers, sizes.shape[0]))
            if sizes.shape != (self.n_layers, self.n_experts):
                raise MoescopeError(
                    f"expert_sizes must have shape [n_layers, n_experts] = {(self.n_layers, self.n_experts)}, "
                    f"got {sizes.shape}"
                )
            object.__setattr__(self, "expert_sizes", np.ascontiguousarray(sizes))

    @property
    def router_width(self) -> int:
        """Columns of a router output: the routed experts, then the non-compute choices."""
        return self.n_experts + len(self.non_compute_ids)

    @property
    def has_costs(self) -> bool:
        return self.expert_sizes is not None and self.hidden_size is not None

    def expert_flops(self) -> np.ndarray:
        """float64 [L, E]: forward FLOPs of one token through one expert = 2 * matrices * hidden * intermediate.

        A matmul of a [1, H] row with an [H, I] matrix is H*I multiply-adds = 2*H*I FLOPs; a SwiGLU expert
        has three such matrices (gate, up, down). Activation and gating FLOPs are ignored (O(I), not O(H*I)).
        """
        if not self.has_costs:
            raise MoescopeError("expert FLOPs need expert_sizes and hidden_size in the analysis context")
        return 2.0 * self.expert_matrices * float(self.hidden_size) * self.expert_sizes.astype(np.float64)

    def missing_router_output(self, needs: str) -> str:
        """The note explaining why router outputs cannot be used for `needs`."""
        if self.router_output_kind == "mixed":
            return f"router outputs mix logits and probabilities across layers: {needs} skipped"
        return f"no router outputs in the trace: {needs} skipped (capture with router outputs to get them)"

    def text_of(self, token_id: int) -> str:
        if self.token_text is None:
            return ""
        if callable(self.token_text):
            return self.token_text(int(token_id))
        return self.token_text.get(int(token_id), "")

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], **overrides: Any) -> AnalysisContext:
        """Build a context from a trace manifest.

        Reads `n_experts`, `top_k`, `router_output_kind`, `expert_sizes`, `n_experts_inferred` either at the top level (an int,
        or a list with one entry per MoE layer) or from a `layers` list of per-layer dicts; `hidden_size`
        at the top level or under `model`.
        `overrides` (e.g. `token_text=`, `thresholds=`) are passed through.
        """
        per_layer = manifest.get("layers")

        def per_layer_values(key: str) -> list[Any] | None:
            if isinstance(per_layer, list) and per_layer and isinstance(per_layer[0], Mapping):
                if all(key in layer for layer in per_layer):
                    return [layer[key] for layer in per_layer]
            return None

        def value(key: str, required: bool) -> Any:
            if key in manifest:
                return manifest[key]
            listed = per_layer_values(key)
            if listed is None and required:
                raise TraceError(f"manifest has no {key!r} (top level or per layer); cannot set up the analyses")
            return listed

        n_experts = value("n_experts", True)
        top_k = value("top_k", True)
        n_layers = manifest.get("n_layers")
        if n_layers is None:
            lists = [v for v in (n_experts, top_k) if isinstance(v, list)]
            n_layers = len(lists[0]) if lists else (len(per_layer) if isinstance(per_layer, list) else None)
        if n_layers is None:
            raise TraceError("manifest says neither n_layers nor per-layer n_experts/top_k")
        kinds = value("router_output_kind", False)
        if isinstance(kinds, list):
            distinct = set(kinds)
            if len(distinct) > 1:
                raise TraceError(f"layers disagree on router_output_kind: {sorted(map(str, distinct))}")
            kinds = kinds[0] if kinds else None
        sizes = value("expert_sizes", False)
        ks = top_k if isinstance(top_k, list) else [top_k]
        if len(set(ks)) > 1:
            raise TraceError(f"layers have different top_k {sorted(set(ks))}; analyses need one k per trace")
        es = n_experts if isinstance(n_experts, list) else [n_experts]
        inferred = value("n_experts_inferred", False)
        non_compute = [layer.get("non_compute_experts") for layer in per_layer if isinstance(layer, Mapping)] \
            if isinstance(per_layer, list) else []
        non_compute = [entry for entry in non_compute if isinstance(entry, Mapping)]
        kwargs: dict[str, Any] = dict(
            non_compute_ids=tuple(sorted({int(i) for entry in non_compute for i in entry.get("ids", ())})),
            non_compute_kinds=tuple(sorted({str(entry.get("kind")) for entry in non_compute})),
            n_experts=int(max(es)),
            top_k=int(ks[0]),
            n_layers=int(n_layers),
            router_output_kind=kinds,
            expert_sizes=None if sizes is None else np.asarray(sizes, dtype=np.int64),
            hidden_size=manifest.get("hidden_size") or (manifest.get("model") or {}).get("hidden_size"),
            vocab_size=manifest.get("vocab_size"),
            n_experts_inferred=any(inferred) if isinstance(inferred, list) else bool(inferred),
        )
        kwargs.update(overrides)
        return cls(**kwargs)
