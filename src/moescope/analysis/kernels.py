"""Small vectorised building blocks shared by the analyses: the per-expert counting kernels, mergeable
histograms, moments, sparse counts.

Everything here adds up: a state built from two shards equals the merge of the states of each.
`add_into` is that merge done in place, for states that are plain sums of fixed-shape arrays.

The counting kernels (every analysis counts experts through these two), each one compiled pass (compiled.py):
  expert_counts  [G, L, E] slots (or summed weights) per (group of tokens, layer, expert)
  pair_counts    [L, E, E] tokens with i in one set and j in another, per layer (co-activation, transitions)
Both take ids [L, T, k] where any id outside [0, E) is no expert and is dropped. histogram_moments bins a
per-token feature [L, T] and takes its moments per layer, in one compiled call too.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from moescope.errors import MoescopeError


def expert_counts(ids: np.ndarray, n_experts: int, *, group: np.ndarray | None = None, n_groups: int = 1,
                  weights: np.ndarray | None = None, keep_invalid: bool = False) -> np.ndarray:
    """int64 [L, E] slots per (layer, expert) of ids [L, T, k] (float64 when `weights` [L, T, k] are summed).

    group: int [T] each token's group in [0, n_groups) (a domain, a fold, a block of tokens): the result is then
    [n_groups, L, E]. keep_invalid: one more column, E, counting the slots that hold no expert.
    One compiled pass (compiled.slot_count_pass), weights summed in (layer, token, slot) order.
    """
    L, T, k = ids.shape
    grouped = group is not None
    group = np.asarray(group, np.intp) if grouped else np.zeros(0, np.intp)
    if grouped and (group.shape != (T,) or T and (group.min() < 0 or group.max() >= n_groups)):
        raise ValueError(f"group must be [{T}] ids in [0, {n_groups})")
    if weights is not None and weights.shape != ids.shape:
        raise ValueError(f"weights {weights.shape} must have the ids' shape {ids.shape}")
    counts = np.zeros((n_groups, L, n_experts + 1), np.int64 if weights is None else np.float64)
    from moescope.analysis.compiled import slot_count_pass  # numba on first use (the vLLM plugin imports this module)

    slot_count_pass(ids, group, n_experts,
                    np.zeros((0, 0, 0)) if weights is None else np.asarray(weights, np.float64), counts)
    counts = counts if keep_invalid else counts[..., :n_experts]
    return counts if grouped else counts[0]


def token_count_dtype(n_tokens: int) -> type:
    """int32 for a table whose cells count tokens (each at most `n_tokens`) while that fits, else int64: half the
    memory of the [L, E, E] tables at today's shapes (a cross_layer state is 637 MiB in int64 at Kimi-K2's)."""
    return np.int32 if n_tokens <= np.iinfo(np.int32).max else np.int64


def widened(counts: np.ndarray, n_tokens: int) -> np.ndarray:
    """`counts` (cells counting tokens), as int64 when `n_tokens` no longer fits its dtype; else itself."""
    wide = token_count_dtype(n_tokens)
    return counts.astype(wide) if np.dtype(wide).itemsize > counts.dtype.itemsize else counts


def pair_counts(a: np.ndarray, b: np.ndarray, n_experts: int, *, group: np.ndarray | None = None,
                n_groups: int = 1, out: np.ndarray | None = None, triangle: bool = False) -> np.ndarray:
    """int64 [L, E, E]: counts[l, i, j] = #tokens t with i in a[l, t] and j in b[l, t].

    a: int [L, T, ka], b: int [L, T, kb]; ids outside [0, E) are no expert (dropped). Each token's ids are
    distinct within a and within b. group: int [T] each token's group in [0, n_groups): the result is then
    [n_groups, L, E, E]. out: an int64 or int32 array of the result's shape to add the counts into (returned;
    int32 only when its cells cannot pass 2**31 - 1, see `token_count_dtype`). triangle: a and b are the same ids
    and each unordered pair of slots (i <= j) is counted once, in cell [a[i], b[j]]: `symmetrised` makes the full
    table from it, at 36 increments a row instead of 64 at top-8.
    One compiled pass (compiled.pair_count_pass), layer by layer, no per-pair array.
    """
    L = a.shape[0]
    shape = (L, n_experts, n_experts) if group is None else (n_groups, L, n_experts, n_experts)
    if out is None:
        out = np.zeros(shape, np.int64)
    elif out.shape != shape or out.dtype not in (np.int64, np.int32):
        raise ValueError(f"out has shape {out.shape} {out.dtype}, the counts {shape} int64 or int32")
    if group is not None and a.shape[1] and (group.min() < 0 or group.max() >= n_groups):
        raise ValueError(f"group ids must be in [0, {n_groups})")
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(f"a {a.shape} and b {b.shape} must cover the same layers and tokens")
    if triangle and a is not b:
        raise ValueError("triangle counts pairs of one set of ids: pass the same array as a and b")
    from moescope.analysis.compiled import pair_count_pass  # numba: imported on first use (the vLLM plugin imports this module)

    pair_count_pass(a, b, np.zeros(0, np.intp) if group is None else np.asarray(group, np.intp), n_experts,
                    out[None] if group is None else out, triangle)
    return out


def symmetrised(triangle: np.ndarray) -> np.ndarray:
    """[..., E, E] full pair counts from `pair_counts(ids, ids, triangle=True)`'s: each off-diagonal pair was counted
    in one of its two cells, the diagonal (a slot with itself) once."""
    full = triangle + np.swapaxes(triangle, -1, -2)
    e = np.arange(full.shape[-1])
    full[..., e, e] //= 2  # the diagonal was added to itself
    return full


def histogram_moments(values: np.ndarray, lo: float, hi: float, bins: int, *, moment_values: np.ndarray | None = None,
                      finite_only: bool = True) -> tuple[np.ndarray, CoMoments]:
    """(int64 [L, bins + 2] histogram of each row of `values` [L, T], CoMoments [L] of each row of `moment_values`
    (default: values), over its finite values when `finite_only`), in one compiled call
    (compiled.histogram_moments_pass): two passes over the feature instead of NumPy's dozen. The sums run in
    row order, so means differ from CoMoments.of's pairwise sums in the last bits.

    Histogram: `bins` equal bins over [lo, hi]; column 0 counts values < lo (and -inf), column bins + 1 values > hi
    (+inf and NaN too); hi itself falls in the last bin.
    """
    moment_values = values if moment_values is None else moment_values
    if values.ndim != 2 or moment_values.shape != values.shape:
        raise ValueError(f"values {values.shape} and moment_values {moment_values.shape} must be one [L, T] shape")
    values, moment_values = (a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)  # float16: exact
                             for a in (values, moment_values))
    L = values.shape[0]
    counts = np.zeros((L, bins + 2), np.int64)
    n, mean, m2 = np.empty(L), np.empty(L), np.empty(L)
    from moescope.analysis.compiled import histogram_moments_pass  # numba on first use

    histogram_moments_pass(values, moment_values, float(lo), bins / (hi - lo), float(hi), int(bins), finite_only,
                           counts, n, mean, m2)
    return counts, CoMoments(n, mean, mean, m2, m2, m2)


def histogram_edges(lo: float, hi: float, bins: int, log: bool = False) -> np.ndarray:
    """float64 [bins + 1] edges matching `histogram_moments` (on log10 values when `log`)."""
    edges = np.linspace(lo, hi, bins + 1)
    return 10.0**edges if log else edges


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats of distributions along `axis` (0 log 0 = 0); rows need not be normalised."""
    p = np.asarray(p, dtype=np.float64)
    total = p.sum(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = p / total
        terms = np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0)
    return -terms.sum(axis=axis)


def js_divergence(p: np.ndarray, q: np.ndarray, axis: int = -1) -> np.ndarray:
    """Jensen-Shannon divergence in bits (0 .. 1) between distributions along `axis` (normalised here)."""
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    p = p / p.sum(axis=axis, keepdims=True)
    q = q / q.sum(axis=axis, keepdims=True)
    m = 0.5 * (p + q)
    return (entropy(m, axis) - 0.5 * entropy(p, axis) - 0.5 * entropy(q, axis)) / math.log(2)


@dataclass(frozen=True, eq=False)
class CoMoments:
    """Mergeable count, means, second moments and co-moment of paired samples (Chan et al. update).

    Arrays share one shape (e.g. [L] for per-layer statistics); scalars are shape ().
    """

    n: np.ndarray
    mean_x: np.ndarray
    mean_y: np.ndarray
    m2_x: np.ndarray  # sum (x - mean_x)^2
    m2_y: np.ndarray
    c_xy: np.ndarray  # sum (x - mean_x)(y - mean_y)

    @classmethod
    def of(
        cls, x: np.ndarray, y: np.ndarray | None = None, axis: int = -1, mask: np.ndarray | None = None
    ) -> CoMoments:
        """Moments of samples along `axis` where `mask` (default: all); y defaults to x."""
        x = np.asarray(x, np.float64)
        y = x if y is None else np.asarray(y, np.float64)
        axis %= x.ndim
        if mask is not None and mask.all():
            mask = None  # the common case: skip the masking passes
        if mask is None:
            n = np.full(x.shape[:axis] + x.shape[axis + 1 :], x.shape[axis], np.float64)
        else:
            n = mask.sum(axis=axis).astype(np.float64)
            x, y = np.where(mask, x, 0.0), np.where(mask, y, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mx = np.where(n > 0, x.sum(axis=axis) / n, 0.0)
            my = mx if y is x else np.where(n > 0, y.sum(axis=axis) / n, 0.0)
        dx = x - np.expand_dims(mx, axis)
        dy = dx if y is x else y - np.expand_dims(my, axis)
        if mask is not None:
            dx, dy = dx * mask, dy * mask
        m2x = (dx * dx).sum(axis)
        m2y = m2x if dy is dx else (dy * dy).sum(axis)
        return cls(n, mx, my, m2x, m2y, m2x if dy is dx else (dx * dy).sum(axis))

    def merge(self, other: CoMoments) -> CoMoments:
        n = self.n + other.n
        with np.errstate(invalid="ignore", divide="ignore"):
            wa = np.where(n > 0, self.n / n, 0.0)
            wb = np.where(n > 0, other.n / n, 0.0)
        dx, dy = other.mean_x - self.mean_x, other.mean_y - self.mean_y
        cross = self.n * wb  # n_a * n_b / n
        return CoMoments(
            n,
            wa * self.mean_x + wb * other.mean_x,
            wa * self.mean_y + wb * other.mean_y,
            self.m2_x + other.m2_x + dx * dx * cross,
            self.m2_y + other.m2_y + dy * dy * cross,
            self.c_xy + other.c_xy + dx * dy * cross,
        )

    def pooled(self) -> CoMoments:
        """Merge along the first axis (e.g. per-layer moments [L] into one overall scalar)."""
        out = CoMoments(*(np.asarray(getattr(self, f)[0]) for f in _COMOMENT_FIELDS))
        for i in range(1, self.n.shape[0]):
            out = out.merge(CoMoments(*(np.asarray(getattr(self, f)[i]) for f in _COMOMENT_FIELDS)))
        return out

    def with_overall(self) -> CoMoments:
        """[L] moments -> [L + 1]: per layer, then pooled."""
        pooled = self.pooled()
        return CoMoments(*(np.append(getattr(self, f), getattr(pooled, f)) for f in _COMOMENT_FIELDS))

    def mean(self) -> np.ndarray:
        return np.where(self.n > 0, self.mean_x, np.nan)

    def std_x(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sqrt(np.where(self.n > 0, self.m2_x / self.n, np.nan))

    def pearson(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.c_xy / np.sqrt(self.m2_x * self.m2_y)


_COMOMENT_FIELDS = ("n", "mean_x", "mean_y", "m2_x", "m2_y", "c_xy")


@dataclass(frozen=True, eq=False)
class SparseCounts:
    """Counts (and optional float sums) keyed by int64 keys: keys sorted and unique.

    keys: int64 [N]; counts: int64 [N]; sums: float64 [N, m] (m may be 0).
    """

    keys: np.ndarray
    counts: np.ndarray
    sums: np.ndarray

    @classmethod
    def empty(cls, n_sums: int = 0) -> SparseCounts:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, n_sums), np.float64))

    @classmethod
    def from_keys(
        cls,
        keys: np.ndarray,
        sums: np.ndarray | None = None,
        weights: np.ndarray | None = None,
        dense_limit: int = 1 << 23,
    ) -> SparseCounts:
        """Count occurrences of each key (each adds `weights` instead of 1 when given) and add up `sums`
        rows [N, m] per key."""
        keys = np.asarray(keys, np.int64).ravel()
        weights = None if weights is None else np.asarray(weights, np.int64).ravel()
        sums = (
            np.zeros((keys.shape[0], 0))
            if sums is None
            else np.asarray(sums, np.float64).reshape(keys.shape[0], -1 if keys.size else np.shape(sums)[-1])
        )
        if keys.size == 0:
            return cls.empty(sums.shape[1])
        lo, hi = int(keys.min()), int(keys.max())
        if hi - lo < min(dense_limit, 16 * keys.size + 1024):  # a dense bincount beats sorting up to here
            shifted = (keys - lo).astype(np.intp)
            counts = np.bincount(shifted, minlength=hi - lo + 1)
            present = np.flatnonzero(counts)
            if weights is not None:
                counts = np.bincount(shifted, weights=weights, minlength=hi - lo + 1).astype(np.int64)
            total = [
                np.bincount(shifted, weights=sums[:, j], minlength=hi - lo + 1)[present] for j in range(sums.shape[1])
            ]
            return cls(
                present.astype(np.int64) + lo,
                counts[present],
                np.stack(total, 1) if total else np.zeros((present.size, 0)),
            )
        order = np.argsort(keys)
        keys, sums = keys[order], sums[order]
        starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
        counts = np.diff(np.append(starts, keys.size)) if weights is None else np.add.reduceat(weights[order], starts)
        return cls(keys[starts], counts, np.add.reduceat(sums, starts, axis=0) if sums.shape[1] else sums[starts])

    def merge(self, other: SparseCounts) -> SparseCounts:
        """Add two tables: keys present in both add up, the others are inserted in order (linear time)."""
        if other.keys.size == 0:
            return self
        if self.keys.size == 0:
            return other
        big, small = (self, other) if self.keys.size >= other.keys.size else (other, self)
        at = np.searchsorted(big.keys, small.keys)  # [n_small] insertion points, non-decreasing
        found = at < big.keys.size
        found[found] = big.keys[at[found]] == small.keys[found]
        new = ~found
        at_new = at[new]
        # output slot of big row i: i + (new keys inserted at or before i), built in one array (the merged table
        # of a long trace is millions of rows: no temporaries of its size beyond this and the output)
        slot_big = np.bincount(at_new, minlength=big.keys.size + 1)[: big.keys.size]
        slot_big += 1
        np.cumsum(slot_big, out=slot_big)
        slot_big -= 1
        slot_new = at_new + np.arange(at_new.size)  # the j-th new key: at_new[j] + j
        matched = slot_big[at[found]]  # output slots of the big rows that small's found keys add to
        n = big.keys.size + at_new.size

        def place(old_rows, new_rows, add=None):
            out = np.empty((n,) + old_rows.shape[1:], old_rows.dtype)
            out[slot_big] = old_rows
            out[slot_new] = new_rows
            if add is not None:
                out[matched] += add  # matched keys are unique: plain fancy add is exact
            return out

        return SparseCounts(place(big.keys, small.keys[new]), place(big.counts, small.counts[new], small.counts[found]),
                            place(big.sums, small.sums[new], small.sums[found]))


def merge_arrays(a, b):
    """Add two equally shaped states field by field (None stays None only if both are None)."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def add_into(running, new):
    """Add state `new` into state `running` in place, field by field, and return `running`.

    For the states of analyses whose merge is the elementwise sum of fixed-shape arrays (MERGE_ADDS):
    arrays are added with np.add(out=), integers summed, None must meet None, and every other field (layers,
    predictor names) must be equal. `running` must own its arrays (see `copy_state`); `new` is only read.
    An int32 array counts tokens (`token_count_dtype`): it is widened to int64 when the two states' n_tokens
    together pass 2**31 - 1.
    """
    if type(running) is not type(new):
        raise MoescopeError(f"cannot merge a {type(running).__name__} with a {type(new).__name__}")
    sums = {}
    tokens = getattr(running, "n_tokens", 0) + getattr(new, "n_tokens", 0)
    for field in dataclasses.fields(running):
        a, b = getattr(running, field.name), getattr(new, field.name)
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and a.dtype != b.dtype \
                and a.dtype.kind == b.dtype.kind == "i":
            wide = np.promote_types(a.dtype, b.dtype)  # int32 token counts widened past 2**31 - 1 tokens
            if a.dtype != wide:
                a = sums[field.name] = a.astype(wide)
        if isinstance(a, np.ndarray) and a.dtype == np.int32 and tokens > np.iinfo(np.int32).max:
            a = sums[field.name] = a.astype(np.int64)  # int32 cells count tokens: widen before they can overflow
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and (
                a.dtype == b.dtype or a.dtype.kind == b.dtype.kind == "i" and a.dtype.itemsize > b.dtype.itemsize):
            np.add(a, b, out=a)
        elif isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)) and not isinstance(a, bool):
            sums[field.name] = a + b
        elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray) or a != b:
            raise MoescopeError(f"cannot merge {type(running).__name__} states whose {field.name} differ "
                                "(shards of different traces or settings?)")
    return dataclasses.replace(running, **sums) if sums else running


def copy_state(state):
    """A copy of a dataclass state whose arrays are its own (writable), for `add_into` to add into."""
    arrays = {f.name: np.array(getattr(state, f.name)) for f in dataclasses.fields(state)
              if isinstance(getattr(state, f.name), np.ndarray)}
    return dataclasses.replace(state, **arrays)


def jsonable(value):
    """Convert NumPy scalars/arrays (and NaN) into plain JSON-serialisable Python values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return None if math.isnan(v) or math.isinf(v) else v
    return value
