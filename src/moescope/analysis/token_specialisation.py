"""Token specialisation: which experts each vocabulary token goes to, and how consistently.

Per token id and layer: expert counts (slots), and counts of each unordered top-k combination. From them:
  top1_share       max_e count / total slots, mean over layers (1/k .. 1; higher = more specialised)
  entropy_norm     H(expert counts) / ln E, mean over layers (0 = always the same experts)
  mode combination the most common top-k set per layer (ties: lowest rank), and its share of occurrences
The vocabulary-specialisation summary weights tokens by occurrences (those with >= min_token_count) and
compares with a token that routes like the whole layer does (layer top-1 share and load entropy).
With expert sizes it exports the token routing table of the variable-size-expert research: per token
the average selected expert size (over all L*k slots; a slot holding no expert counts as size 0), expert FLOPs per occurrence (all layers, from the actual counts; see
context.expert_flops) and the FLOPs of the per-layer mode combinations (how the seed's table is built).
Occurrences (and output entropy) are exact for every token. Expert and combination counts are exact for the
tokens of `ctx.token_table`: run_analyses fills it in a first pass with the most frequent tokens that fit
`thresholds.token_table_cells` (token, layer, expert) cells, or (token, layer, combination) cells when a small
combination space is counted (ties to the lower id; every token when all fit),
and a run folds each piece's counts into one dense table of those tokens' cells (`merge_into`; a large combination
space is counted sparse and merged in a tree), so memory does not grow with the trace; the other tokens' top1_share, entropy_norm, sizes and FLOPs are NaN,
and the summary's `tokens_without_expert_counts` and notes say how many tokens and occurrences were cut.
Without a table (ctx.token_table None, e.g. a one-shot stream of shards) every token is kept, and memory
grows with the distinct (token, layer, expert) triples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd

from moescope.analysis.combinations import CombinationCoder
from moescope.analysis.context import AnalysisContext
from moescope.analysis.kernels import SparseCounts, jsonable
from moescope.analysis.result import TABLE_PIECE_ROWS, ChunkedTable
from moescope.analysis.shard_view import ShardView
from moescope.errors import MoescopeError
from moescope.trace.shard import ShardData

NAME = "token_specialisation"
IDS_ONLY = True  # reads expert ids (and next-layer predictions), never gate weights or router outputs
_INT32_TOKENS = 1 << 31
DENSE_ROW_CELLS = 1 << 20  # (layer, expert or combination) cells of one token up to which counting uses a dense row


@dataclass(frozen=True, eq=False)
class TokenState:
    layers: tuple[int, ...]
    occurrences: SparseCounts  # key token_id; sums [entropy sum, entropy count]
    combinations: SparseCounts | None  # key (token * L + l) * R + rank; None when keys would overflow
    expert_counts: SparseCounts | None  # key (token * L + l) * E + e; only kept without combinations
    # (expert counts follow from the combination counts, so they are derived at finalize when possible)
    dense: np.ndarray | None = None  # int64 [V', L * C]: a folded run's counts of ctx.token_table's V' tokens (`merge_into`),
    # C = R with combinations, else E; the SparseCounts field it replaces is then empty


def _combination_space(ctx: AnalysisContext) -> int | None:
    """R = number of combination ranks, or None when (token, layer, rank) does not fit one int64."""
    coder = CombinationCoder.for_context(ctx.n_experts, ctx.top_k)
    if coder is None:
        return None
    vocab = ctx.vocab_size or _INT32_TOKENS
    return coder.n_codes if vocab * ctx.n_layers * coder.n_codes < 2**62 else None


def _count_by_token(inverse: np.ndarray, uniq: np.ndarray, inner: np.ndarray, inner_size: int) -> SparseCounts:
    """Count keys (local token index, inner) and return them keyed by (token id * inner_size + inner).

    inverse: intp [T] local index of each token; inner: int64 [L, T, ...] in [0, inner_size) or -1 (dropped).
    """
    if inner_size <= DENSE_ROW_CELLS:  # one token's cells fit a dense row: a compiled pass, token by token
        from moescope.analysis.compiled import group_count_pass  # numba on first use (the vLLM plugin imports it)

        m = int(np.prod(inner.shape[2:]))  # slots per token: 1 (a combination) or k (experts)
        inner = np.ascontiguousarray(inner.reshape(inner.shape[:2] + (m,)), np.int64)  # [L, T, m]
        keys, counts = np.empty(inner.size, np.int64), np.empty(inner.size, np.int64)
        n = group_count_pass(np.ascontiguousarray(inverse, np.int64), uniq.size, inner, inner_size, keys, counts)
        counts = SparseCounts(keys[:n], counts[:n], np.zeros((n, 0)))
    else:  # a large combination space: sort the keys
        local = inverse.reshape((1, -1) + (1,) * (inner.ndim - 2)) * inner_size + inner
        counts = SparseCounts.from_keys(local[inner >= 0])
    return SparseCounts(
        uniq[counts.keys // inner_size] * inner_size + counts.keys % inner_size, counts.counts, counts.sums
    )


def _dense_cells(ctx: AnalysisContext) -> int | None:
    """Cells per token of the counted key, L * R with combinations, else L * E; None when a small combination space
    is not what is counted (a large one grows with the distinct sets seen, at most L per occurrence: kept sparse)."""
    R = _combination_space(ctx)
    if R is None:
        return ctx.n_layers * ctx.n_experts
    return ctx.n_layers * R if R <= 16 * ctx.n_experts else None  # Mixtral's 45 combinations: dense


def kept_tokens(token_ids: np.ndarray, occurrences: np.ndarray, ctx: AnalysisContext) -> np.ndarray:
    """int64 sorted ids of the most frequent tokens whose (layer, expert) counts fit thresholds.token_table_cells
    (ties to the lower id): every token seen when all fit."""
    # a token's cells: (layer, combination) when combinations are counted and their space is small, else (layer, expert)
    per_token = _dense_cells(ctx) or ctx.n_layers * ctx.n_experts
    budget = max(1, ctx.thresholds.token_table_cells // per_token)
    order = np.lexsort((token_ids, -occurrences))[:budget]  # most occurrences first, then the lower id
    return np.sort(token_ids[order]).astype(np.int64)


def folds(ctx: AnalysisContext) -> bool:
    """Whether a run keeps one running state and merges each piece's into it in order (`merge_into`): with a token
    table whose tokens' cells fit one dense table, so memory stays flat in the trace's length. Otherwise (no table,
    e.g. a one-shot stream of shards, or a large combination space) states merge in a tree (runner._TreeReduce)."""
    return ctx.token_table is not None and (ctx.token_table.size == 0 or _dense_cells(ctx) is not None)


def _piece_keys(view: ShardView, ctx: AnalysisContext) -> tuple[SparseCounts, np.ndarray | slice, np.ndarray, int]:
    """(occurrences of every token, the tokens whose cells are counted (intp [T'] the table's, or every token's
    slice), int64 [L, T', m] their inner keys (layer, combination) or (layer, expert), -1 = none, cells per token)."""
    L, E = view.L, view.E
    token_id = view.shard.token_id.astype(np.int64)
    entropy = view.shard.output_entropy
    if entropy is None:
        entropy = np.full(view.T, np.nan, np.float32)
    finite = np.isfinite(entropy)
    occurrences = SparseCounts.from_keys(token_id, sums=np.stack([np.where(finite, entropy, 0.0), finite], axis=1))
    kept: np.ndarray | slice = slice(None)  # every token: views, not copies
    if ctx.token_table is not None:  # expert counts for the table's tokens only
        at = np.minimum(np.searchsorted(ctx.token_table, token_id), max(ctx.token_table.size - 1, 0))
        kept = np.flatnonzero(ctx.token_table[at] == token_id) if ctx.token_table.size else np.zeros(0, np.intp)
    layer = np.arange(L, dtype=np.int64)[:, None, None]
    R = _combination_space(ctx)
    cells = L * (E if R is None else R)
    if isinstance(kept, np.ndarray) and not kept.size:  # occurrences only (a first pass's empty table): no cells
        return occurrences, kept, np.zeros((L, 0, 1), np.int64), cells
    if R is not None:
        return occurrences, kept, layer * R + view.multiset_rank[:, kept, None], cells  # [L, T', 1]
    ids = view.ids[:, kept]
    return occurrences, kept, np.where(ids < E, layer * E + ids, -1), cells  # [L, T', k]


def accumulate(shard: ShardData | ShardView, ctx: AnalysisContext) -> TokenState:
    view = ShardView.of(shard, ctx)
    occurrences, kept, inner, cells = _piece_keys(view, ctx)
    uniq, inverse = np.unique(view.shard.token_id[kept].astype(np.int64), return_inverse=True)
    counts = _count_by_token(inverse, uniq, inner, cells)
    if _combination_space(ctx) is not None:
        return TokenState(view.layers, occurrences, counts, None)
    return TokenState(view.layers, occurrences, None, counts)


def accumulate_into(running: TokenState, shard: ShardData | ShardView, ctx: AnalysisContext) -> TokenState:
    """`merge_into(running, accumulate(shard))` when the run `folds`: the piece's cells counted straight into the
    running dense table by one compiled pass, with no sparse table of the piece in between."""
    from moescope.analysis.compiled import row_count_pass  # numba on first use (the vLLM plugin imports analysis/)

    view = ShardView.of(shard, ctx)
    if running.layers != view.layers:
        raise MoescopeError("cannot merge token states of different layers")
    occurrences, kept, inner, cells = _piece_keys(view, ctx)
    running = _densified(running, ctx)
    if kept.size:
        row = np.searchsorted(ctx.token_table, view.shard.token_id[kept].astype(np.int64))  # [T'] its table row
        inner = np.ascontiguousarray(inner.reshape(inner.shape[:2] + (-1,)), np.int64)
        row_count_pass(row, inner, running.dense)
    return dataclasses.replace(running, occurrences=running.occurrences.merge(occurrences))


def merge(a: TokenState, b: TokenState) -> TokenState:
    if a.layers != b.layers or (a.combinations is None) != (b.combinations is None):
        raise MoescopeError("cannot merge token states of different layers or combination coding")
    if a.combinations is not None:
        return TokenState(a.layers, a.occurrences.merge(b.occurrences), a.combinations.merge(b.combinations), None)
    return TokenState(a.layers, a.occurrences.merge(b.occurrences), None, a.expert_counts.merge(b.expert_counts))


def merge_into(running: TokenState, new: TokenState, ctx: AnalysisContext) -> TokenState:
    """`merge(running, new)` when the run `folds`: the counted cells of the table's tokens held in one dense table
    (made from `running`'s counts on the first call, then owned by the running state), `new`'s added into it in
    place. The SparseCounts field the table replaces stays, empty, to say what is counted."""
    if running.layers != new.layers or (running.combinations is None) != (new.combinations is None):
        raise MoescopeError("cannot merge token states of different layers or combination coding")
    running = _densified(running, ctx)
    _add_counts(running.dense, new, ctx.token_table)
    return dataclasses.replace(running, occurrences=running.occurrences.merge(new.occurrences))


def _densified(state: TokenState, ctx: AnalysisContext) -> TokenState:
    """`state` with its counts in a dense table of its own (itself when it has one)."""
    if state.dense is not None:
        return state
    dense = np.zeros((ctx.token_table.size, _dense_cells(ctx) if ctx.token_table.size else 0), np.int64)
    _add_counts(dense, state, ctx.token_table)
    emptied = SparseCounts.empty()
    return TokenState(state.layers, state.occurrences, None if state.combinations is None else emptied,
                      None if state.expert_counts is None else emptied, dense)


def _add_counts(dense: np.ndarray, state: TokenState, token_table: np.ndarray) -> None:
    """Add a state's counts (dense, or sparse keyed token * cells + cell) into `dense` [V', cells], whose rows are
    token_table's tokens."""
    if state.dense is not None:
        dense += state.dense
        return
    counts = state.expert_counts if state.combinations is None else state.combinations
    if not counts.keys.size:
        return
    cells = dense.shape[1]
    token = counts.keys // cells
    row = np.searchsorted(token_table, token)
    if row.max(initial=0) >= token_table.size or (token_table[row] != token).any():
        raise MoescopeError("token-specialisation counts of a token outside the run's token table")
    dense.ravel()[row * cells + counts.keys % cells] += counts.counts  # keys are unique: a plain fancy add


def _expert_counts_from_combinations(combos: SparseCounts, L: int, E: int, k: int, R: int) -> SparseCounts:
    """(token, layer, expert) counts from (token, layer, combination) counts: each set adds 1 per member."""
    coder = CombinationCoder.for_context(E, k)
    rank = combos.keys % R
    ids = coder.decode(np.arange(R))[rank] if R <= rank.size else coder.decode(rank)  # [N, k] sorted, E = none
    group = combos.keys // R  # [N] token * L + l, non-decreasing
    starts = np.ones(group.size, bool)  # [N] the first entry of each (token, layer); codes can be negative (token -1)
    starts[1:] = group[1:] != group[:-1]
    first = np.flatnonzero(starts)  # [G]
    g = np.cumsum(starts) - 1  # [N] its index among the G groups
    real = ids < E
    cell = (g[:, None] * E + ids)[real]  # (group, expert) cells: G * E of them, not (tokens * L * E)
    total = np.bincount(cell, weights=np.broadcast_to(combos.counts[:, None], ids.shape)[real], minlength=first.size * E)
    present = np.flatnonzero(total)
    return SparseCounts(group[first][present // E] * E + present % E, total[present].astype(np.int64),
                        np.zeros((present.size, 0)))


@dataclass(frozen=True, eq=False)
class TokenResult:
    layers: tuple[int, ...]
    n_experts: int
    top_k: int
    token_ids: np.ndarray  # int64 [V] distinct tokens seen, ascending
    occurrences: np.ndarray  # int64 [V]
    mean_output_entropy: np.ndarray  # float64 [V] (NaN when not recorded)
    top1_share: np.ndarray  # float64 [V]
    entropy_norm: np.ndarray  # float64 [V]
    expert_counts: SparseCounts  # key (token * L + l) * E + e
    mode_combination: np.ndarray | None  # int64 [V, L, k] sorted expert ids (-1: not an expert)
    mode_share: np.ndarray | None  # float64 [V, L]
    avg_expert_size: np.ndarray | None  # float64 [V]
    flops_per_token: np.ndarray | None  # float64 [V] expert FLOPs per occurrence, all layers
    mode_flops: np.ndarray | None  # float64 [V] expert FLOPs of the mode combinations, all layers
    expert_sizes: np.ndarray | None  # int64 [L, E]
    texts: tuple[str, ...] | None
    baseline_top1_share: float  # mean over layers of the busiest expert's share of the layer
    baseline_entropy_norm: float  # mean over layers of the normalised load entropy
    min_token_count: int
    notes: tuple[str, ...] = ()

    def expert_table(self) -> pd.DataFrame:
        """Long table: token_id, layer, expert, count."""
        return self.expert_pieces().to_pandas()

    def expert_pieces(self) -> ChunkedTable:
        """`expert_table` built TABLE_PIECE_ROWS rows at a time (up to thresholds.token_table_cells rows in all)."""
        L, E = len(self.layers), self.n_experts
        keys, counts = self.expert_counts.keys, self.expert_counts.counts
        layers = np.asarray(self.layers)

        def pieces():
            for lo in range(0, max(keys.size, 1), TABLE_PIECE_ROWS):
                key = keys[lo : lo + TABLE_PIECE_ROWS]
                yield pd.DataFrame({"token_id": key // (L * E), "layer": layers[(key // E) % L], "expert": key % E,
                                    "count": counts[lo : lo + TABLE_PIECE_ROWS]})

        return ChunkedTable(pieces, int(keys.size))

    def routing_table(self) -> pd.DataFrame:
        """One row per token: the exportable token routing table (sorted by FLOPs when known)."""
        table = {
            "token_id": self.token_ids,
            "token": list(self.texts) if self.texts is not None else [""] * self.token_ids.size,
            "occurrences": self.occurrences,
            "mean_output_entropy": self.mean_output_entropy,
            "top1_share": self.top1_share,
            "entropy_norm": self.entropy_norm,
        }
        if self.avg_expert_size is not None:
            table["avg_expert_size"] = self.avg_expert_size
        if self.flops_per_token is not None:
            table["flops_per_token"] = self.flops_per_token
            table["mode_combination_flops"] = self.mode_flops
        if self.mode_combination is not None:
            for i, layer in enumerate(self.layers):
                table[f"layer_{layer}"] = _format_combinations(
                    self.mode_combination[:, i], None if self.expert_sizes is None else self.expert_sizes[i]
                )
                table[f"layer_{layer}_share"] = self.mode_share[:, i]
        df = pd.DataFrame(table)
        if self.flops_per_token is not None:
            df = df.sort_values("flops_per_token", kind="stable").reset_index(drop=True)
        return df

    def chunked_tables(self) -> dict[str, pd.DataFrame | ChunkedTable]:
        return {"tokens": self.routing_table(), "token_experts": self.expert_pieces()}

    def to_pandas(self) -> dict[str, pd.DataFrame]:
        return {"tokens": self.routing_table(), "token_experts": self.expert_table()}

    def summary(self) -> dict:
        frequent = (self.occurrences >= self.min_token_count) & np.isfinite(self.top1_share)  # counts kept
        weights = np.where(frequent, self.occurrences, 0).astype(np.float64)

        def weighted(x):
            return float((np.where(frequent, x, 0.0) * weights).sum() / weights.sum()) if weights.sum() else None

        order = np.lexsort((-self.occurrences, -np.where(frequent, self.top1_share, -1)))[:10]
        out = {
            "distinct_tokens": int(self.token_ids.size),
            "tokens_counted": int(frequent.sum()),
            "tokens_without_expert_counts": int(np.isnan(self.top1_share).sum()),
            "top1_share": weighted(self.top1_share),
            "baseline_top1_share": self.baseline_top1_share,
            "entropy_norm": weighted(self.entropy_norm),
            "baseline_entropy_norm": self.baseline_entropy_norm,
            "mode_combination_share": weighted(_row_mean(self.mode_share))
            if self.mode_share is not None
            else None,
            "most_specialised": [
                {
                    "token_id": int(self.token_ids[i]),
                    "token": self.texts[i] if self.texts else "",
                    "top1_share": self.top1_share[i],
                    "occurrences": int(self.occurrences[i]),
                }
                for i in order
                if frequent[i]
            ],
            "notes": list(self.notes),
        }
        if self.flops_per_token is not None:
            out["mean_flops_per_counted_token"] = weighted(self.flops_per_token)  # the counted tokens only: token_cost has every token's
        return jsonable(out)


def _row_mean(values: np.ndarray) -> np.ndarray:
    """float64 [V]: mean of each row's finite values; NaN for a row with none (a token whose counts were cut)."""
    finite = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(finite, values, 0.0).sum(axis=1) / finite.sum(axis=1)


def _format_combinations(combos: np.ndarray, sizes: np.ndarray | None) -> list[str]:
    """'(3,7)' or, with sizes, '(3(2432),7(128))' for each row of sorted ids [V, k] (-1 entries dropped). Each distinct
    row is formatted once (a layer's modes repeat: Mixtral's 8 experts have 28 pairs for every token)."""
    if not combos.shape[0]:
        return []
    order = np.lexsort(combos.T[::-1])  # rows sorted (a lexsort of k columns: np.unique(axis=0) is ~20x slower)
    ordered = combos[order]
    starts = np.ones(len(order), bool)
    starts[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    rows = ordered[starts]  # [U, k] distinct rows
    inverse = np.empty(len(order), np.intp)
    inverse[order] = np.cumsum(starts) - 1  # [V] each row's distinct row
    if sizes is None:
        texts = ["(" + ",".join(str(e) for e in row if e >= 0) + ")" for row in rows.tolist()]
    else:
        texts = ["(" + ",".join(f"{e}({sizes[e]})" for e in row if e >= 0) + ")" for row in rows.tolist()]
    return np.array(texts, dtype=object)[inverse].tolist()


def _sparse_of(state: TokenState, ctx: AnalysisContext) -> TokenState:
    """A folded state's dense table (`merge_into`) back as the SparseCounts it replaced: nonzero cells, keys ascending."""
    if state.dense is None:
        return state
    cells = state.dense.shape[1]
    present = np.flatnonzero(state.dense)
    counts = SparseCounts(ctx.token_table[present // cells] * cells + present % cells, state.dense.ravel()[present],
                          np.zeros((present.size, 0)))
    if state.combinations is not None:
        return TokenState(state.layers, state.occurrences, counts, None)
    return TokenState(state.layers, state.occurrences, None, counts)


def finalize(state: TokenState, ctx: AnalysisContext) -> TokenResult:
    state = _sparse_of(state, ctx)
    L, E, k = len(state.layers), ctx.n_experts, ctx.top_k
    occ = state.occurrences
    token_ids, occurrences = occ.keys, occ.counts
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_entropy = np.where(occ.sums[:, 1] > 0, occ.sums[:, 0] / occ.sums[:, 1], np.nan)

    R = _combination_space(ctx)
    expert_counts = state.expert_counts
    if state.combinations is not None:
        expert_counts = _expert_counts_from_combinations(state.combinations, L, E, k, R)
    sums = _per_token_sums(expert_counts, token_ids, L, E, ctx)
    counted = _counted(token_ids, ctx)  # bool [V]: the token's expert counts were kept
    layers_seen = np.maximum(sums["layers"], 1)
    top1_share = sums["top"] / layers_seen
    entropy_norm = sums["entropy"] / layers_seen
    top1_share[~counted] = np.nan
    entropy_norm[~counted] = np.nan

    load = sums["load"].reshape(L, E)
    with np.errstate(invalid="ignore", divide="ignore"):
        layer_share = load / load.sum(axis=1, keepdims=True)
        baseline_entropy = (
            np.nanmean(-np.where(layer_share > 0, layer_share * np.log(layer_share), 0).sum(axis=1) / np.log(E))
            if E > 1 and load.sum()
            else float("nan")
        )
        baseline_top1 = float(np.nanmean(layer_share.max(axis=1))) if load.sum() else float("nan")

    notes = []
    avg_size = flops = mode_flops = None
    if ctx.expert_sizes is not None:
        avg_size = np.where(counted, sums["size"] / (occurrences * L * k), np.nan)  # slots holding no expert count as size 0
    if ctx.has_costs:
        flops = sums["flops"] / occurrences
        flops[~counted] = np.nan

    mode = share = None
    if state.combinations is not None:
        mode, share = _mode_combinations(state.combinations, token_ids, occurrences, L, E, k, ctx)
        if ctx.has_costs:
            per_expert = np.concatenate([ctx.expert_flops(), np.zeros((L, 1))], axis=1)  # id -1 -> column E costs 0
            mode_flops = per_expert[np.arange(L)[None, :, None], np.where(mode >= 0, mode, E)].sum(axis=(1, 2))
            mode_flops[~counted] = np.nan
    else:
        notes.append(
            f"C(E+k, k) top-{k} combinations of {E} experts do not fit a 64-bit key: mode combinations skipped"
        )
    if not ctx.has_costs:
        notes.append("no expert sizes and hidden size in the context: no per-token FLOPs")
    if not counted.all():
        cut = occurrences[~counted].sum()
        notes.append(f"per-token expert counts kept for the {int(counted.sum()):,} most frequent of {token_ids.size:,} "
                     f"tokens ({ctx.thresholds.token_table_cells:,} (token, layer, expert) cells, "
                     f"{1 - cut / max(occurrences.sum(), 1):.1%} of occurrences); the other {int((~counted).sum()):,} "
                     "tokens have occurrences and output entropy only; the layer baselines are over the kept tokens")
    texts = tuple(ctx.text_of(t) for t in token_ids) if ctx.token_text is not None else None  # vocabulary-sized
    return TokenResult(
        state.layers,
        E,
        k,
        token_ids,
        occurrences,
        mean_entropy,
        top1_share,
        entropy_norm,
        expert_counts,
        mode,
        share,
        avg_size,
        flops,
        mode_flops,
        ctx.expert_sizes,
        texts,
        baseline_top1,
        float(baseline_entropy),
        ctx.thresholds.min_token_count,
        tuple(notes),
    )


STATS_CHUNK = 1 << 18  # (token, layer, expert) counts per chunk of `_per_token_sums`: its temporaries stay bounded


def _per_token_sums(expert_counts: SparseCounts, token_ids: np.ndarray, L: int, E: int,
                    ctx: AnalysisContext) -> dict[str, np.ndarray]:
    """Sums over each token's (layer) rows of its (token, layer, expert) counts, float64 [V] each: "layers" seen,
    "top" (busiest expert's share) and "entropy" (normalised), "size" and "flops" of its slots (with expert sizes,
    with costs); and "load" [L * E] (slots per layer and expert). Taken over chunks of about STATS_CHUNK counts cut
    between tokens, so each token's sums are added in the order of one whole pass (the same floats) while the
    temporaries stay a chunk's size, not the kept table's (up to thresholds.token_table_cells counts)."""
    V = token_ids.size
    out = {name: np.zeros(V) for name in ("layers", "top", "entropy", "size", "flops")}
    out["load"] = np.zeros(L * E)
    keys, counts = expert_counts.keys, expert_counts.counts
    per_expert = ctx.expert_flops() if ctx.has_costs else None  # [L, E]
    lo = 0
    while lo < keys.size:
        hi = min(keys.size, lo + STATS_CHUNK)
        if hi < keys.size:  # back to the first count of the token there, or past it when it alone is longer
            first = int(np.searchsorted(keys, keys[hi] // (L * E) * (L * E)))
            hi = first if first > lo else int(np.searchsorted(keys, (keys[hi] // (L * E) + 1) * (L * E)))
        key, count = keys[lo:hi], counts[lo:hi]
        group = key // E  # token * L + layer, sorted
        starts = np.flatnonzero(np.concatenate([[True], group[1:] != group[:-1]]))
        total = np.add.reduceat(count, starts).astype(np.float64)
        p = count / np.repeat(total, np.diff(np.append(starts, count.size)))
        tok = np.searchsorted(token_ids, group[starts] // L)  # [groups] index into token_ids
        out["layers"] += np.bincount(tok, minlength=V)
        out["top"] += np.bincount(tok, weights=np.maximum.reduceat(count, starts) / total, minlength=V)
        if E > 1:
            out["entropy"] += np.bincount(tok, weights=-np.add.reduceat(p * np.log(p), starts) / np.log(E), minlength=V)
        layer, expert = group % L, key % E
        out["load"] += np.bincount(layer * E + expert, weights=count, minlength=L * E)
        token = np.searchsorted(token_ids, key // (L * E))  # [n] token index of each count
        if ctx.expert_sizes is not None:
            out["size"] += np.bincount(token, weights=count * ctx.expert_sizes[layer, expert], minlength=V)
        if per_expert is not None:
            out["flops"] += np.bincount(token, weights=count * per_expert[layer, expert], minlength=V)
        lo = hi
    return out


def _counted(token_ids: np.ndarray, ctx: AnalysisContext) -> np.ndarray:
    """bool [V]: tokens whose expert counts were kept (all of them without a token table)."""
    if ctx.token_table is None:
        return np.ones(token_ids.size, bool)
    return np.isin(token_ids, ctx.token_table)


def _mode_combinations(combos: SparseCounts, token_ids, occurrences, L, E, k, ctx) -> tuple[np.ndarray, np.ndarray]:
    """(int64 [V, L, k] sorted ids of each token's most common combination per layer, float64 [V, L] its share)."""
    R = _combination_space(ctx)
    coder = CombinationCoder.for_context(E, k)
    keys, counts = combos.keys, combos.counts
    if not keys.size:  # no token's counts kept
        return np.full((token_ids.size, L, k), -1, np.int64), np.full((token_ids.size, L), np.nan)
    group = keys // R  # token * L + layer, sorted
    starts = np.flatnonzero(np.concatenate([[True], group[1:] != group[:-1]]))
    sizes = np.diff(np.append(starts, counts.size))
    best = np.maximum.reduceat(counts, starts)
    is_best = counts == np.repeat(best, sizes)
    first_best = np.minimum.reduceat(
        np.where(is_best, np.arange(counts.size), counts.size), starts
    )  # lowest rank wins ties
    ids = coder.decode(keys[first_best] % R)  # [G, k]
    ids[ids >= E] = -1
    tok = np.searchsorted(token_ids, group[starts] // L)
    layer = group[starts] % L
    mode = np.full((token_ids.size, L, k), -1, np.int64)
    share = np.full((token_ids.size, L), np.nan)
    mode[tok, layer] = ids
    share[tok, layer] = best / occurrences[tok]
    return mode, share
