"""What cache-aware lossy routing costs in quality: the model run with exactly that routing.

For every knob and capacity of `moescope offload --lossy ... --model M --data D`: every MoE layer gets an LRU
cache, simulated along each sequence's positions inside the forward pass (simulate/lossy.py's
`route_along_positions`, the same code as the offline replay), and the routing it decides is applied through
`moescope.intervene(route=...)`; the next layers see the changed hidden states, so the routing a cache sees
is the routing the changed model produces. ΔNLL per predicted token against the unmodified model, with its
standard error over sequences (quant/sweep.py's `paired_delta`). The model is loaded in float32, so that the
ΔNLL measures the routing and not bfloat16 rounding of renormalised weights. Sequences run one at a time (batch size 1:
each forward is one sequence, so rows are its positions). Knob "lru" is lossless: its ΔNLL is 0 exactly.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from moescope.simulate.lossy import Knob, lossy_frame, route_along_positions


class _LayerCache:
    """route= function of one MoE layer for one (knob, capacity); accumulates what it decided."""

    def __init__(self, knob: Knob, capacity: int, n_experts: int, index: int, counts: np.ndarray, fetched: np.ndarray):
        self.knob, self.capacity, self.E, self.index = knob, capacity, n_experts, index
        self.counts, self.fetched = counts, fetched  # float64 [L, 5] and int64 [L, E] (prefill only)

    def __call__(self, ids: torch.Tensor, weights: torch.Tensor, logits: torch.Tensor, weigh):
        n, k = ids.shape  # one sequence: rows are positions
        ids_np = ids.cpu().numpy().astype(np.intp)[None]  # [1, T, k]
        w = weights.detach().double().cpu().numpy()[None]
        selection = logits.detach().double().cpu().numpy()[None] if self.knob.kind == "rerank" else None
        r = route_along_positions(ids_np, w, np.ones((1, n), bool), self.knob, self.capacity, self.E, selection)
        used = torch.from_numpy(r.used[0]).to(ids.device)
        if self.knob.kind == "rerank":
            new_ids = torch.from_numpy(r.ids[0]).to(ids.device).long()
            new_weights = weigh(new_ids).float()
        else:
            new_ids = ids
            kept = torch.where(used, weights.float(), torch.zeros_like(weights.float()))
            scale = weights.float().sum(dim=1, keepdim=True) / kept.sum(dim=1, keepdim=True)  # renormalised to the total
            new_weights = kept * scale
        self.counts[self.index] += [k * n, r.used.sum(), r.hit.sum(), n, r.discarded.sum()]
        miss = r.used[0] & ~r.hit[0]
        self.fetched[self.index] += np.bincount(r.ids[0][miss], minlength=self.E)
        return new_ids, new_weights


def lossy_quality(model, layers, batches, knobs: tuple[Knob, ...], capacities: tuple[int, ...],
                  expert_bytes: np.ndarray, progress: bool = False) -> pd.DataFrame:
    """lossy_frame rows (source "model", phase prefill) with delta_nll and delta_nll_se on every row of a
    (knob, capacity). `batches` hold one sequence each."""
    from moescope.intervention.context import intervene
    from moescope.quant.reference import end_to_end, reference_pass
    from moescope.quant.sweep import paired_delta

    L, E = len(layers), layers[0].n_experts
    ref = reference_pass(model, batches, None, layer_list=None, keep_outputs=False, progress=progress, local=False)
    frames = []
    for knob in knobs:
        for capacity in capacities:
            counts = np.zeros((1, 1, 2, L, 5))
            fetched = np.zeros((1, 1, 2, L, E), np.int64)
            route = {i: _LayerCache(knob, capacity, E, i, counts[0, 0, 0], fetched[0, 0, 0]) for i in range(L)}
            with torch.no_grad(), intervene(model, route=route, layers=layers):
                nll, _, _ = end_to_end(model, None, ref, start=0, layer_list=None)
            delta, se = paired_delta(ref.nll, nll, ref.nll_seq)
            frame = lossy_frame(counts, fetched, expert_bytes, (knob,), (capacity,), tuple(range(L)), ("prefill",), "model")
            frames.append(frame.assign(delta_nll=delta, delta_nll_se=se, tokens_scored=int(ref.nll.numel())))
    return pd.concat(frames, ignore_index=True)
