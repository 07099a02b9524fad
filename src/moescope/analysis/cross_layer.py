"""Cross-layer predictability: how well layer N's routing predicts layer N+d's (speculative prefetching).

transitions[d-1, l, i, j] = tokens with i in S(l) and j in S(l+d), d = 1..max_hop, where S(l) is the
token's top-k set at layer l; P(j at l+d | i at l) = transitions / load(l, i).

Each predictor names k experts for the target layer; recall = |predicted ∩ S(target)| / |S(target)|,
summed over tokens ("recall@k"):
  same_index        S(l) itself, for target l+d (hop d).
  transition        the k experts most often seen at l+d after the token's first-choice expert at l
                    (largest gate weight), learned on the other fold of the trace (two-fold cross-fitting,
                    see `fold_of`). Ties go to the expert with more load at l+d in the learning fold, then
                    to the lower index. Conditioning on the first choice (not the whole set) keeps the
                    sufficient statistics an E x E table per (fold, hop, layer), so it streams.
  popularity        the static baseline: the k most-loaded experts of the target layer in the other fold
                    (ties to the lower index), whatever the token. Reported for hops 0..max_hop (its
                    recall depends only on the target layer; hop 0 is previous_token's target, the same
                    layer). A predictor that does not beat it has learned nothing a fixed pin would not.
  previous_token    S(target) of the previous token of the same sequence (hop reported as 0).
  router_lookahead  layer l+1's router applied to layer l's router input, computed during capture and
                    carried as ShardData.predicted_next_ids (hop 1 only).

Folds are by document, not by sequence: sequences cut from one document route alike, so a table learned
on one of them and tested on its neighbour would flatter the learned predictors. A token's fold is one bit
of a fixed 64-bit mix of its document key (`ShardData.document`, a hash of the sequences table's source
and doc_id; each sequence is its own document when a shard has no document keys), so both folds are
filled whichever sequences a trace holds. When one fold has no routed slots (a trace of one document),
the learned predictors (transition, popularity) cannot be cross-fitted: they are left out, with a warning.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd

from moescope.analysis.context import AnalysisContext
from moescope.analysis.kernels import expert_counts, jsonable, merge_arrays, pair_counts, token_count_dtype, widened
from moescope.analysis.result import TABLE_PIECE_ROWS, ChunkedTable
from moescope.analysis.rowwise import top_m_by_partition
from moescope.analysis.shard_view import ShardView, predicted_next_ids_of, set_overlap
from moescope.errors import MoescopeError
from moescope.trace.shard import ShardData

NAME = "cross_layer"
MERGE_ADDS = True  # merge is the sum of fixed-shape arrays: runs fold it in place (runner._Fold)
PREDICTORS = ("same_index", "transition", "popularity", "previous_token", "router_lookahead")
LEARNED = ("transition", "popularity")  # predictors learned on the other fold


@dataclass(frozen=True, eq=False)
class CrossLayerState:
    layers: tuple[int, ...]
    n_tokens: int
    transitions: np.ndarray  # int32 (int64 past 2**31 - 1 tokens) [K, L, E, E] (zero where l + d >= L)
    first_choice_transitions: np.ndarray  # int32 (int64 past 2**31 - 1 tokens) [2, K, L, E, E] by fold
    load_by_fold: np.ndarray  # int64 [2, L, E]
    previous_overlap: np.ndarray  # int64 [L] sum over tokens with a previous token of |S_t ∩ S_t-1|
    previous_targets: np.ndarray  # int64 [L] real experts in S_t over those tokens
    lookahead_overlap: np.ndarray | None  # int64 [L] |P(l) ∩ S(l+1)| at source l (last entry 0)


def fold_of(shard: ShardData) -> np.ndarray:
    """intp [T]: each token's cross-fitting fold, 0 or 1: the top bit of splitmix64 of its document key.

    The key is `shard.document` (see trace/shard.py `document_key`), or the seq_id when the shard has no
    document keys (every sequence its own document). Mixing first means consecutive ids do not alternate.
    """
    key = shard.seq_id if shard.document is None else shard.document
    return (_splitmix64(np.asarray(key, np.int64).astype(np.uint64)) >> np.uint64(63)).astype(np.intp)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """uint64 [...]: the splitmix64 finaliser (Steele, Lea and Flood 2014), wrapping arithmetic."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def empty_fold_warning(fold_slots: np.ndarray) -> str | None:
    """The warning for a trace whose documents all fall in one fold (fold_slots: int64 [2]), else None."""
    if (fold_slots > 0).all():
        return None
    return (f"every routed slot falls in one of the two cross-fitting folds ({int(fold_slots.sum())} slots in one, 0 in "
            "the other: the trace holds one document, or documents that all hash alike): the transition and "
            "popularity predictors, learned on the other fold, cannot be evaluated and are left out; "
            "capture more documents to get them")


def accumulate(shard: ShardData | ShardView, ctx: AnalysisContext) -> CrossLayerState:
    view = ShardView.of(shard, ctx)
    L, E, K = view.L, view.E, ctx.thresholds.max_hop
    count = token_count_dtype(view.T)
    empty = CrossLayerState(view.layers, 0, np.zeros((K, L, E, E), count), np.zeros((2, K, L, E, E), count),
                            np.zeros((2, L, E), np.int64), np.zeros(L, np.int64), np.zeros(L, np.int64),
                            None if predicted_next_ids_of(view.shard) is None else np.zeros(L, np.int64))
    return accumulate_into(empty, view, ctx)


def accumulate_into(state: CrossLayerState, shard: ShardData | ShardView, ctx: AnalysisContext) -> CrossLayerState:
    """`merge(state, accumulate(shard))`, adding the shard's counts into `state`'s own arrays (which it must
    own): no second [K, L, E, E] table per shard (130 MiB at DeepSeek-V3's shape)."""
    view = ShardView.of(shard, ctx)
    L, T, E = view.L, view.T, view.E
    state = widened_state(state, state.n_tokens + T)
    K = state.transitions.shape[0]
    predicted = predicted_next_ids_of(view.shard)
    if state.layers != view.layers or K != ctx.thresholds.max_hop:
        raise MoescopeError("cannot merge cross-layer states of different layers or max_hop")
    if (state.lookahead_overlap is None) != (predicted is None):
        raise MoescopeError("cannot merge shards with and without predicted_next_ids")
    fold = fold_of(view.shard)  # [T]
    for d in range(1, min(K, L - 1) + 1):
        pair_counts(view.ids[:-d], view.ids[d:], E, out=state.transitions[d - 1, : L - d])
        # per fold: tokens with first choice i at l and j in S(l + d)
        pair_counts(view.first_choice[:-d, :, None], view.ids[d:], E, group=fold, n_groups=2,
                    out=state.first_choice_transitions[:, d - 1, : L - d])
    state.load_by_fold[...] += expert_counts(view.ids, E, group=fold, n_groups=2)  # [2, L, E]
    starts = ~view.has_previous  # tokens without a previous token
    state.previous_overlap[...] += view.previous_overlap.sum(axis=1)
    state.previous_targets[...] += view.valid_slots - (view.ids[:, starts] < E).sum(axis=(1, 2))
    if predicted is not None:
        pred = np.where((predicted >= 0) & (predicted < E), predicted, E)  # [L, T, k']
        state.lookahead_overlap[: L - 1] += set_overlap(pred[: L - 1], view.ids[1:], E).sum(axis=1)
    return dataclasses.replace(state, n_tokens=state.n_tokens + T)


def widened_state(state: CrossLayerState, n_tokens: int) -> CrossLayerState:
    """`state` with count tables wide enough for `n_tokens` tokens (a cell counts tokens, so it is at most that)."""
    return dataclasses.replace(state, transitions=widened(state.transitions, n_tokens),
                               first_choice_transitions=widened(state.first_choice_transitions, n_tokens))


def merge(a: CrossLayerState, b: CrossLayerState) -> CrossLayerState:
    if a.layers != b.layers or a.transitions.shape != b.transitions.shape:
        raise MoescopeError("cannot merge cross-layer states of different layers or max_hop")
    if (a.lookahead_overlap is None) != (b.lookahead_overlap is None):
        raise MoescopeError("cannot merge shards with and without predicted_next_ids")
    tokens = a.n_tokens + b.n_tokens
    a, b = widened_state(a, tokens), widened_state(b, tokens)
    return CrossLayerState(
        a.layers,
        tokens,
        a.transitions + b.transitions,
        a.first_choice_transitions + b.first_choice_transitions,
        a.load_by_fold + b.load_by_fold,
        a.previous_overlap + b.previous_overlap,
        a.previous_targets + b.previous_targets,
        merge_arrays(a.lookahead_overlap, b.lookahead_overlap),
    )


def top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """int64 [..., k]: indices of the k largest values along the last axis, descending, ties to the lower index
    (a stable argsort of -values, cut at k; a partition first when k is small)."""
    if k >= values.shape[-1] or values.shape[-1] <= 16:
        return np.argsort(-values, axis=-1, kind="stable")[..., :k]
    if values.dtype.kind in "iu":  # counts and loads: one compiled pass per row
        from moescope.analysis.compiled import top_k_pass  # numba on first use (the vLLM plugin imports analysis/)

        rows = np.ascontiguousarray(values.reshape(-1, values.shape[-1]))
        out = np.empty((rows.shape[0], k), np.int64)
        top_k_pass(rows, k, out)
        return out.reshape(values.shape[:-1] + (k,))
    return np.moveaxis(top_m_by_partition(np.moveaxis(values, -1, 0), k)[0], 0, -1).astype(np.int64)


def top_predictions(counts: np.ndarray, target_load: np.ndarray, k: int) -> np.ndarray:
    """int64 [..., E, k]: for each source row i, the k targets j with most counts[..., i, j].

    counts: int64 [..., E, E]; target_load: int64 [..., E] breaks ties (more load first), then lower j.
    """
    score = counts.astype(np.int64) * (int(target_load.max(initial=0)) + 1) + target_load[..., None, :]  # [..., E, E]
    return top_indices(score, k)


def popular_experts(load: np.ndarray, k: int) -> np.ndarray:
    """int64 [..., k]: the k most-loaded experts of each load row [..., E], ties to the lower index."""
    return top_indices(load, k)


@dataclass(frozen=True, eq=False)
class PrefetchTable:
    """What the learned predictors learned, per fold of the trace (index = fold, see `fold_of`).

    counts[f, l, i, j]: tokens of fold f with first choice i at layer l and j in S(l+1);
    target_load[f, l, j]: slots of expert j at layer l among tokens of fold f.
    """

    counts: np.ndarray  # int64 [2, L - 1, E, E]
    target_load: np.ndarray  # int64 [2, L, E]
    _learned: dict = dataclasses.field(default_factory=dict, repr=False)  # k -> predictions: learned once per table

    def predictions(self, k: int) -> np.ndarray:
        """int64 [2, L - 1, E, k]: predictions[f, l, i] learned on fold f, for layer l + 1 (the tables are read-only:
        learned on the first call, then reused by every shard)."""
        if k not in self._learned:
            F, L1, E, _ = self.counts.shape
            learned = np.empty((F, L1, E, min(k, E)), np.int64)
            for f in range(F):  # one [E, E] table at a time: a few MiB however many layers and experts
                for layer in range(L1):
                    learned[f, layer] = top_predictions(self.counts[f, layer], self.target_load[f, layer + 1], k)
            self._learned[k] = learned
        return self._learned[k]

    def padded_predictions(self, k: int, dtype) -> np.ndarray:
        """`predictions(k)` as `dtype` [2, L - 1, E + 1, k], row E (a token with no first choice) all E."""
        key = ("padded", k, np.dtype(dtype).str)
        if key not in self._learned:
            pred = self.predictions(k)
            E = pred.shape[2]
            self._learned[key] = np.concatenate([pred, np.full(pred.shape[:2] + (1, pred.shape[3]), E)], axis=2).astype(dtype)
        return self._learned[key]

    def popular(self, k: int) -> np.ndarray:
        """int64 [2, L, k]: popular[f, l], the k most-loaded experts of layer l in fold f."""
        return popular_experts(self.target_load, k)

    def empty_fold_warning(self) -> str | None:
        return empty_fold_warning(self.target_load.sum(axis=(1, 2)))

    def pooled(self) -> PrefetchTable:
        """Both folds together: use a table learned on another trace as-is for every token."""
        counts = self.counts.sum(axis=0, keepdims=True)
        load = self.target_load.sum(axis=0, keepdims=True)
        return PrefetchTable(np.concatenate([counts, counts]), np.concatenate([load, load]))


@dataclass(frozen=True, eq=False)
class CrossLayerResult:
    layers: tuple[int, ...]
    n_tokens: int
    top_k: int
    transitions: np.ndarray  # int64 [K, L, E, E]
    load: np.ndarray  # int64 [L, E]
    first_choice_transitions: np.ndarray  # int64 [2, K, L, E, E]
    load_by_fold: np.ndarray  # int64 [2, L, E]
    recall: pd.DataFrame  # predictor, hop, source_layer, target_layer, hits, targets, recall
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()  # what a user must see (the CLI prints it on stderr): an empty fold

    def conditional(self) -> np.ndarray:
        """float64 [K, L, E, E]: P(j at l+d | i at l) (NaN where expert i is never selected at l)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.transitions / self.load[None, :, :, None]

    def prefetch_table(self) -> PrefetchTable:
        return PrefetchTable(self.first_choice_transitions[:, 0, :-1], self.load_by_fold)

    def recall_overall(self) -> pd.DataFrame:
        """Pooled recall per (predictor, hop)."""
        grouped = self.recall.groupby(["predictor", "hop"], sort=False)[["hits", "targets"]].sum().reset_index()
        grouped["recall"] = grouped["hits"] / grouped["targets"].where(grouped["targets"] > 0)
        return grouped

    def transition_table(self) -> ChunkedTable:
        """The nonzero transitions as a long table (hop, source_layer, target_layer, expert_from, expert_to, count,
        p_to_given_from), by hop, source layer, expert_from, expert_to; built in pieces of whole source layers."""
        K, L, E, _ = self.transitions.shape
        per_piece = max(1, TABLE_PIECE_ROWS // max(1, E * E))  # source layers per piece

        def pieces():
            layers = np.asarray(self.layers)
            for d in range(1, K + 1):
                for lo in range(0, L, per_piece):
                    counts = self.transitions[d - 1, lo : lo + per_piece]  # [l, E, E]
                    l, i, j = np.nonzero(counts)
                    count = counts[l, i, j].astype(np.int64)
                    load = self.load[lo + l, i]
                    with np.errstate(invalid="ignore", divide="ignore"):
                        p = count / load
                    yield pd.DataFrame({
                        "hop": np.full(len(l), d, np.int64),
                        "source_layer": layers[lo + l],
                        "target_layer": layers[lo + l + d],
                        "expert_from": i.astype(np.int64),
                        "expert_to": j.astype(np.int64),
                        "count": count,
                        "p_to_given_from": p,
                    })

        return ChunkedTable(pieces, int(np.count_nonzero(self.transitions)))

    def chunked_tables(self) -> dict[str, pd.DataFrame | ChunkedTable]:
        return {"transitions": self.transition_table(), "recall": self.recall, "recall_overall": self.recall_overall()}

    def to_pandas(self) -> dict[str, pd.DataFrame]:
        return {name: table.to_pandas() if isinstance(table, ChunkedTable) else table
                for name, table in self.chunked_tables().items()}

    def summary(self) -> dict:
        overall = self.recall_overall()
        out = {f"recall_{r.predictor}_hop{r.hop}": r.recall for r in overall.itertuples()}
        recall = {(r.predictor, r.hop): r.recall for r in overall.itertuples() if np.isfinite(r.recall)}
        hop1 = _competing(recall, 1)
        if hop1:
            best = max(hop1, key=hop1.get)
            out["best_predictor_hop1"] = best
            baseline = recall.get(("popularity", _target_hop(best, 1)))
            if baseline is not None:
                out["best_minus_popularity_hop1"] = hop1[best] - baseline
        verdicts = (_versus_popularity(recall, d) for d in range(1, self.transitions.shape[0] + 1))
        out["versus_popularity"] = [v for v in verdicts if v]
        out["fold_slots"] = self.load_by_fold.sum(axis=(1, 2))
        out["notes"] = list(self.notes)
        return jsonable(out)


def _target_hop(predictor: str, hop: int) -> int:
    """The hop of the layer a predictor names when it competes at `hop`: previous_token names the same layer (0)."""
    return 0 if predictor == "previous_token" else hop


def _competing(recall: dict[tuple[str, int], float], hop: int) -> dict[str, float]:
    """{predictor: recall} of the predictors competing at `hop` (previous_token competes at hop 1)."""
    return {p: v for (p, h), v in recall.items() if p != "popularity" and h == _target_hop(p, hop) and (h == hop or hop == 1)}


def _versus_popularity(recall: dict[tuple[str, int], float], hop: int) -> str | None:
    """One sentence judging the best predictor at `hop` against the popularity baseline on the same targets."""
    competing = _competing(recall, hop)
    if not competing:
        return None
    best = max(competing, key=competing.get)
    base = recall.get(("popularity", _target_hop(best, hop)))
    if base is None:
        return None
    diff = competing[best] - base
    if diff > 0:
        return f"hop {hop}: {best} beats popularity by {diff:+.3f} recall ({competing[best]:.3f} vs {base:.3f})"
    return f"hop {hop}: no predictor beats popularity ({base:.3f}); the best, {best}, reaches {competing[best]:.3f} ({diff:+.3f})"


def finalize(state: CrossLayerState, ctx: AnalysisContext) -> CrossLayerResult:
    K, L, E, _ = state.transitions.shape
    k = ctx.top_k
    load = state.load_by_fold.sum(axis=0)  # [L, E]
    slots = load.sum(axis=1)  # [L] real experts selected per layer
    layers = np.asarray(state.layers)
    frames = []
    hop = np.arange(1, K + 1)[:, None]  # [K, 1]
    src = np.arange(L)[None, :]  # [1, L]
    valid = src + hop < L  # [K, L]
    target = np.minimum(src + hop, L - 1)
    same_index = np.trace(state.transitions, axis1=2, axis2=3, dtype=np.int64)  # [K, L]
    frames.append(_recall_rows("same_index", hop, src, target, same_index, slots[target], valid, layers))

    warning = empty_fold_warning(state.load_by_fold.sum(axis=(1, 2)))
    if warning is None:
        target_load = state.load_by_fold[:, target]  # [2, K, L, E] load of the target layer per fold
        counts = state.first_choice_transitions  # [2, K, L, E, E]
        hits = np.zeros((K, L), np.int64)
        for f in range(2):  # tokens of fold f are predicted with the table learned on fold 1 - f
            for d in range(K):
                for l in range(L):  # one [E, E] table at a time: bounded memory
                    learned = top_predictions(counts[1 - f, d, l], target_load[1 - f, d, l], k)  # [E, k]
                    hits[d, l] += np.take_along_axis(counts[f, d, l], learned, axis=-1).sum(dtype=np.int64)
        frames.append(_recall_rows("transition", hop, src, target, hits, slots[target], valid, layers))
        popular = popular_experts(state.load_by_fold, k)[::-1]  # [2, L, k]: what tokens of fold f are given
        popular_hits = np.take_along_axis(state.load_by_fold, popular, axis=-1).sum(axis=(0, 2))  # [L] per target
        hops = np.arange(K + 1)[:, None]  # hop 0: the same layer, previous_token's target
        targets = np.minimum(src + hops, L - 1)
        frames.append(_recall_rows("popularity", hops, src, targets, popular_hits[targets], slots[targets], src + hops < L, layers))

    frames.append(
        _recall_rows(
            "previous_token",
            np.zeros((1, 1), int),
            src,
            src,
            state.previous_overlap[None],
            state.previous_targets[None],
            np.ones((1, L), bool),
            layers,
        )
    )
    notes = [] if warning is None else [warning]
    if state.lookahead_overlap is not None:
        frames.append(
            _recall_rows(
                "router_lookahead",
                np.ones((1, 1), int),
                src,
                np.minimum(src + 1, L - 1),
                state.lookahead_overlap[None],
                slots[np.minimum(src + 1, L - 1)],
                src + 1 < L,
                layers,
            )
        )
    else:
        notes.append("router_lookahead needs predicted_next_ids computed during capture (the model's routers); skipped")
    if L == 1:
        notes.append("one MoE layer: no cross-layer transitions")
    recall = pd.concat(frames, ignore_index=True)
    return CrossLayerResult(
        state.layers,
        state.n_tokens,
        k,
        state.transitions,
        load,
        state.first_choice_transitions,
        state.load_by_fold,
        recall,
        tuple(notes),
        () if warning is None else (warning,),
    )


def _recall_rows(predictor, hop, src, target, hits, targets, valid, layers) -> pd.DataFrame:
    """Long table rows for one predictor from [H, L] arrays (broadcast), keeping `valid` cells."""
    shape = np.broadcast_shapes(np.shape(hop), np.shape(src), np.shape(hits), np.shape(valid))
    cols = [np.broadcast_to(x, shape)[np.broadcast_to(valid, shape)] for x in (hop, src, target, hits, targets)]
    hops, sources, targets_layer, hit, tgt = cols
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(tgt > 0, hit / np.maximum(tgt, 1), np.nan)
    return pd.DataFrame(
        {
            "predictor": predictor,
            "hop": hops.astype(np.int64),
            "source_layer": layers[sources],
            "target_layer": layers[targets_layer],
            "hits": hit.astype(np.int64),
            "targets": tgt.astype(np.int64),
            "recall": rate,
        }
    )
