"""ShardView: one shard plus the derived arrays several analyses share, each computed once on demand.

The runner wraps every shard in a view so that, e.g., router probabilities or expert loads are computed
once per shard however many analyses read them. Each analysis also accepts a bare ShardData.

Expert ids outside [0, E) (dropped tokens marked -1, non-compute choices with ids >= E: LongCat's identity
experts, ZAYA's skip) are not experts: they are mapped to the sentinel id E, which every count then drops.
Router outputs have R = ctx.router_width columns (the E routed experts, then the non-compute choices): the
router's distribution is over all R of them.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np

from moescope.analysis.context import AnalysisContext
from moescope.analysis.kernels import expert_counts
from moescope.analysis.rowwise import sort_ascending, sort_descending, top_m
from moescope.errors import MoescopeError
from moescope.trace.shard import ShardData


def predicted_next_ids_of(shard: ShardData) -> np.ndarray | None:
    """int16 [L, T, k'] next-layer router predictions captured with the shard, or None."""
    return getattr(shard, "predicted_next_ids", None)


class ShardView:
    """Derived per-shard arrays, cached. All shapes use L layers, T tokens, k slots, E experts."""

    def __init__(self, shard: ShardData, ctx: AnalysisContext):
        L, T, k = shard.topk_ids.shape
        if L != ctx.n_layers:
            raise MoescopeError(f"shard has {L} MoE layers but the analysis context says {ctx.n_layers}")
        if k != ctx.top_k:
            raise MoescopeError(f"shard has top-{k} routing but the analysis context says top-{ctx.top_k}")
        if shard.topk_weights is not None and shard.topk_weights.shape != (L, T, k):
            raise MoescopeError(f"topk_weights shape {shard.topk_weights.shape} != topk_ids shape {(L, T, k)}")
        if shard.router_output is not None and shard.router_output.shape != (L, T, ctx.router_width):
            raise MoescopeError(
                f"router_output shape {shard.router_output.shape} != [L, T, routed experts + non-compute choices] = "
                f"{(L, T, ctx.router_width)}"
            )
        self.shard, self.ctx = shard, ctx
        self.L, self.T, self.k, self.E, self.R = L, T, k, ctx.n_experts, ctx.router_width

    @classmethod
    def of(cls, shard: ShardData | ShardView, ctx: AnalysisContext) -> ShardView:
        return shard if isinstance(shard, ShardView) else cls(shard, ctx)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(int(x) for x in self.shard.layers)

    @cached_property
    def ids_by_slot(self) -> np.ndarray:
        """intp [k, L, T]: expert ids slot-major, invalid ones replaced by the sentinel E."""
        raw = self.shard.topk_ids.transpose(2, 0, 1)
        return np.where((raw >= 0) & (raw < self.E), raw, self.E).astype(np.intp)

    @cached_property
    def ids(self) -> np.ndarray:
        """intp [L, T, k]: expert ids, invalid ones replaced by the sentinel E."""
        raw = self.shard.topk_ids
        return np.where((raw >= 0) & (raw < self.E), raw, self.E).astype(np.intp)

    @cached_property
    def compact_ids(self) -> np.ndarray:
        """int16 [L, T, k]: `ids` in two bytes (E < 2**15): what the expert cache's LRU pass walks."""
        if self.E >= np.iinfo(np.int16).max:
            raise MoescopeError(f"{self.E} experts do not fit int16 ids")
        raw = self.shard.topk_ids
        return np.where((raw >= 0) & (raw < self.E), raw, self.E).astype(np.int16)

    @cached_property
    def load(self) -> np.ndarray:
        """int64 [L, E + 1]: slots per expert per layer; column E counts invalid slots."""
        return expert_counts(self.ids, self.E, keep_invalid=True)

    @cached_property
    def non_compute_slots(self) -> np.ndarray:
        """int64 [L]: slots that went to a non-compute choice (ids E .. R-1)."""
        raw = self.shard.topk_ids
        return ((raw >= self.E) & (raw < self.R)).sum(axis=(1, 2), dtype=np.int64)

    @cached_property
    def valid_slots(self) -> np.ndarray:
        """int64 [L]: slots that hold a real expert."""
        return self.load[:, : self.E].sum(axis=1)

    @cached_property
    def weights_by_slot(self) -> np.ndarray:
        """float64 [k, L, T]: gate weights slot-major."""
        if self.shard.topk_weights is None:
            raise MoescopeError("this analysis needs gate weights: the shard was read without them (ids_only)")
        return self.shard.topk_weights.transpose(2, 0, 1).astype(np.float64, order="C")  # C: each slot contiguous

    @cached_property
    def slots_in_weight_order(self) -> bool:
        """Every token's gate weights are descending by slot, as a trace's are (trace/slots.py); NaN never is. A shard
        read without its weights (ids_only) is a trace's, so its slots are in that order."""
        w = self.shard.topk_weights  # [L, T, k] as stored
        if w is None:
            return True
        return bool((w[..., :-1] >= w[..., 1:]).all())

    @cached_property
    def sorted_weights(self) -> np.ndarray:
        """float64 [k, L, T]: each token's gate weights, descending."""
        return self.weights_by_slot if self.slots_in_weight_order else sort_descending(self.weights_by_slot)

    @cached_property
    def sorted_ids(self) -> np.ndarray:
        """intp [k, L, T]: each token's expert ids ascending (sentinels last)."""
        return sort_ascending(self.ids_by_slot)

    @cached_property
    def first_choice(self) -> np.ndarray:
        """intp [L, T]: the expert with the largest gate weight (first such column on ties): slot 0 of a trace,
        whose slots are in gate-weight order (trace/slots.py), and of any hand-built shard alike."""
        if self.slots_in_weight_order:
            return np.ascontiguousarray(self.ids[..., 0])
        w, ids = self.weights_by_slot, self.ids_by_slot
        best, choice = w[0], ids[0]
        for c in range(1, self.k):  # k slots, each a whole-shard operation
            better = w[c] > best
            best = np.where(better, w[c], best)
            choice = np.where(better, ids[c], choice)
        return choice

    @cached_property
    def has_previous(self) -> np.ndarray:
        """bool [T]: token t-1 is the previous position of the same sequence."""
        return self.shard.same_sequence_as_previous()

    @cached_property
    def sequence_start(self) -> np.ndarray:
        """intp [T]: index of the first token of each token's sequence within the shard."""
        starts = np.flatnonzero(~self.has_previous)
        return starts[np.searchsorted(starts, np.arange(self.T), side="right") - 1]

    @cached_property
    def previous_overlap(self) -> np.ndarray:
        """int64 [L, T]: |S_t ∩ S_{t-1}| over real experts; 0 where t has no previous token."""
        out = np.zeros((self.L, self.T), np.int64)
        out[:, 1:] = set_overlap(self.ids[:, 1:], self.ids[:, :-1], self.E)
        return out * self.has_previous[None, :]

    @cached_property
    def _router(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray] | None:
        """(probs float32 [R, L, T] expert-major, logsumexp float64 [L, T] or None, entropy float64 [L, T])."""
        out = self.shard.router_output
        if out is None or self.ctx.router_output_kind not in ("logits", "probs"):
            return None
        z = np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32)  # [E, L, T]
        if self.ctx.router_output_kind == "probs":
            with np.errstate(divide="ignore", invalid="ignore"):
                plogp = z * np.log(z + (z == 0))  # 0 log 0 = 0
            return z, None, -plogp.sum(axis=0, dtype=np.float64)
        peak = z.max(axis=0)  # [L, T]
        probs = np.exp(z - peak)  # [E, L, T]
        total = probs.sum(axis=0, dtype=np.float64)  # [L, T]
        probs /= total.astype(np.float32)
        lse = peak + np.log(total)
        entropy = lse - (probs * z).sum(axis=0, dtype=np.float64)  # H = lse - sum p * logit
        return probs, lse, entropy

    @property
    def router_probs(self) -> np.ndarray | None:
        """float32 [R, L, T] router probabilities, expert-major (softmax of logits when logits were captured)."""
        return None if self._router is None else self._router[0]

    @property
    def router_logsumexp(self) -> np.ndarray | None:
        """float64 [L, T] log-sum-exp of router logits (None unless logits were captured)."""
        return None if self._router is None else self._router[1]

    @property
    def router_entropy(self) -> np.ndarray | None:
        """float64 [L, T] entropy (nats) of each token's router distribution."""
        return None if self._router is None else self._router[2]

    @cached_property
    def router_top(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(intp [m, L, T] router class ids, float32 [m, L, T] probabilities) of the m most probable of the R
        classes, descending, ties to the lower id; m = min(R, max(k + 1, largest what-if k))."""
        probs = self.router_probs
        if probs is None:
            return None
        return top_m(probs, min(self.R, max(self.k + 1, *self.ctx.thresholds.what_if_top_k)))

    @cached_property
    def multiset_rank(self) -> np.ndarray | None:
        """int64 [L, T]: the unordered top-k set as one integer (see combinations.py); None if too many sets."""
        from moescope.analysis.combinations import CombinationCoder

        coder = CombinationCoder.for_context(self.E, self.k)
        return None if coder is None else coder.encode_sorted(self.sorted_ids)


def set_overlap(a: np.ndarray, b: np.ndarray, sentinel: int) -> np.ndarray:
    """int64 [...]: |set(a) ∩ set(b)| per position, counting real ids only; each set holds distinct ids.

    a: [..., ka], b: [..., kb] integer ids, a position's ids last (ShardView.ids' layout); ids equal to `sentinel`
    never match.
    """
    from moescope.analysis.compiled import set_overlap_pass  # numba on first use (the vLLM plugin imports analysis/)

    shape = np.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    rows = (int(np.prod(shape[:-1])), shape[-1]) if shape else (1, 1)  # [M, N]: all but the last position axis merged
    a, b = (np.broadcast_to(x, shape + x.shape[-1:]).reshape(rows + x.shape[-1:]) for x in (a, b))
    out = np.empty(rows, np.int64)
    set_overlap_pass(a, b, int(sentinel), out)
    return out.reshape(shape)
