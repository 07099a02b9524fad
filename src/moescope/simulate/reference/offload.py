"""Expert offloading simulated one token, one layer, one expert at a time (see simulate/offload.py).

Each sequence starts with empty caches: one per layer ("layer" scope) or one over (layer, expert) keys
("global"). For every token and layer, in order: the predictor's prefetch batch is inserted, then the
token's experts are looked up (hits decided before any is inserted) and inserted. No key of the batch
being handled is ever evicted.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

from moescope.analysis.reference.cross_layer import fold, learn, popular, predict
from moescope.analysis.reference.rows import first_choice, is_next_position, real, token_rows

NEVER = float("inf")


class LRU:
    def __init__(self, capacity, future=None):
        self.capacity, self.entries = capacity, OrderedDict()  # least recently touched first

    def touch(self, batch, is_lookup):
        absent = [x not in self.entries for x in batch]
        for x, missing in zip(batch, absent):
            if missing:
                if len(self.entries) >= self.capacity:
                    del self.entries[next(k for k in self.entries if k not in batch)]
                self.entries[x] = None
        for x in reversed(batch):  # the first column ends up the most recent
            self.entries.move_to_end(x)
        return absent


class LFU:
    def __init__(self, capacity, future=None):
        self.capacity, self.cached, self.uses, self.last = capacity, set(), Counter(), {}
        self.clock = 0

    def touch(self, batch, is_lookup):
        absent = [x not in self.cached for x in batch]
        for x, missing in zip(batch, absent):
            if missing:
                if len(self.cached) >= self.capacity:
                    victim = min((k for k in self.cached if k not in batch), key=lambda k: (self.uses[k], self.last[k]))
                    self.cached.remove(victim)
                self.cached.add(x)
        self.clock += 1
        for j, x in enumerate(batch):
            if is_lookup:
                self.uses[x] += 1
            self.last[x] = (self.clock, -j)  # the first column is the most recent
        return absent


class Belady:
    """future: the stream's remaining events, a list of (is_lookup, batch) consumed as the stream runs."""

    def __init__(self, capacity, future):
        self.capacity, self.cached, self.future = capacity, set(), future

    def distance(self, key):
        """Events until the key's next lookup; NEVER when it is prefetched first or never looked up again."""
        for t, (is_lookup, batch) in enumerate(self.future):
            if key in batch:
                return t if is_lookup else NEVER
        return NEVER

    def touch(self, batch, is_lookup):
        self.future.pop(0)  # the current event
        absent = [x not in self.cached for x in batch]
        for x, missing in zip(batch, absent):
            if missing:
                if len(self.cached) >= self.capacity:
                    # farthest next lookup; among equals the lower key
                    victim = max((k for k in self.cached if k not in batch), key=lambda k: (self.distance(k), -_order(k)))
                    self.cached.remove(victim)
                self.cached.add(x)
        return absent


def _order(key):
    return key if isinstance(key, int) else key[0] * 10**6 + key[1]


class ARC:
    """Megiddo & Modha's ARC, request by request, with the batch rules of simulate/arc.py."""

    def __init__(self, capacity, future=None):
        self.c, self.p = capacity, 0.0
        self.t1, self.t2, self.b1, self.b2 = OrderedDict(), OrderedDict(), OrderedDict(), OrderedDict()  # LRU first

    def touch(self, batch, is_lookup):
        cached = [x in self.t1 or x in self.t2 for x in batch]
        for x, hit in zip(batch, cached):
            if hit and is_lookup:  # to the MRU end of T2
                self.t1.pop(x, None)
                self.t2.pop(x, None)
                self.t2[x] = None
            elif hit:  # prefetched and cached: to the MRU end of its own list
                lst = self.t1 if x in self.t1 else self.t2
                lst.move_to_end(x)
        for x, hit in zip(batch, cached):
            if not hit:
                self.miss(x, set(batch), is_lookup)
        return [not hit for hit in cached]

    def miss(self, x, protected, is_request):
        c = self.c
        if is_request and x in self.b1:
            self.p = min(c, self.p + max(1.0, len(self.b2) / len(self.b1)))
            del self.b1[x]
            self.replace(False, protected)
            self.t2[x] = None
            return
        if is_request and x in self.b2:
            self.p = max(0.0, self.p - max(1.0, len(self.b1) / len(self.b2)))
            del self.b2[x]
            self.replace(True, protected)
            self.t2[x] = None
            return
        self.b1.pop(x, None)  # a prefetched key leaves its ghost list without adapting p
        self.b2.pop(x, None)
        if len(self.t1) + len(self.b1) == c:
            if len(self.t1) < c:
                self.b1.popitem(last=False)
                self.replace(False, protected)
            else:
                del self.t1[next(k for k in self.t1 if k not in protected)]
        elif len(self.t1) + len(self.t2) + len(self.b1) + len(self.b2) >= c:
            if len(self.t1) + len(self.t2) + len(self.b1) + len(self.b2) == 2 * c:
                self.b2.popitem(last=False)
            self.replace(False, protected)
        self.t1[x] = None

    def replace(self, x_in_b2, protected):
        t1 = len(self.t1)
        lru1 = next((k for k in self.t1 if k not in protected), None)
        lru2 = next((k for k in self.t2 if k not in protected), None)
        want_t1 = t1 >= 1 and (t1 > self.p or (x_in_b2 and t1 == self.p))
        if (want_t1 and lru1 is not None) or (not want_t1 and lru2 is None):
            del self.t1[lru1]
            self.b1[lru1] = None
        else:
            del self.t2[lru2]
            self.b2[lru2] = None


POLICIES = {"lru": LRU, "lfu": LFU, "belady": Belady, "arc": ARC}


def _streams(rows, ctx, scope, prefetch, tables):
    """Per cold-start run of tokens: its events [(is_lookup, batch, phase, layer)] in order, per cache."""
    E, L = ctx.n_experts, ctx.n_layers
    runs, prev = [], None
    for row in rows:
        if not is_next_position(prev, row):
            runs.append([])
        runs[-1].append(row)
        prev = row
    for run in runs:
        caches = {}  # cache id -> events
        for row in run:
            for layer in range(L):
                cache = layer if scope == "layer" else "all"
                events = caches.setdefault(cache, [])
                key = (lambda e: e) if scope == "layer" else (lambda e, l=layer: (l, e))
                guess = _prefetch(row, layer, prefetch, tables, ctx)
                if guess:
                    events.append((False, _distinct([key(e) for e in guess]), row.generated, layer))
                events.append((True, _distinct([key(e) for e in real(row.experts[layer], E)]), row.generated, layer))
        yield from caches.values()


def _distinct(batch):
    return list(dict.fromkeys(batch))


def _prefetch(row, layer, prefetch, tables, ctx):
    E, k = ctx.n_experts, ctx.top_k
    if prefetch == "none":
        return []
    other = 1 - fold(row)
    if prefetch == "popularity":  # at every layer
        return popular(tables[1], other, layer, k, E)
    if layer == 0:
        return []
    if prefetch == "same-index":
        return real(row.experts[layer - 1], E)
    if prefetch == "router-lookahead":
        return real(row.predicted[layer - 1], E)
    if prefetch == "transition":
        counts, load = tables
        fc = first_choice(row.experts[layer - 1], row.weights[layer - 1], E)
        return [] if fc is None else predict(counts, load, other, 1, layer - 1, fc, k, E)
    raise ValueError(prefetch)


def compute(shards, ctx, *, policy: str, capacity: int, scope: str = "layer", prefetch: str = "none") -> dict:
    """{(phase, layer): [lookups, hits, prefetched, prefetch_loads]} and fetched Counter {(layer, expert): n}
    (experts moved over the link: demand misses and prefetch loads); phase 0 prefill, 1 decode."""
    rows = list(token_rows(shards))
    tables = learn(rows, ctx, 1) if prefetch in ("transition", "popularity") else None
    counts, fetched = {}, Counter()
    for events in _streams(rows, ctx, scope, prefetch, tables):
        future = [(is_lookup, batch) for is_lookup, batch, _, _ in events]
        cache = POLICIES[policy](capacity, future)
        for is_lookup, batch, phase, layer in events:
            absent = cache.touch(batch, is_lookup)
            cell = counts.setdefault((int(phase), layer), [0, 0, 0, 0])
            if is_lookup:
                cell[0] += len(batch)
                cell[1] += len(batch) - sum(absent)
            else:
                cell[2] += len(batch)
                cell[3] += sum(absent)
            for x, missing in zip(batch, absent):
                if missing:
                    fetched[(layer, x if isinstance(x, int) else x[1])] += 1
    return {"counts": counts, "fetched": fetched}


def _lookups(rows, ctx):
    """(row, layer, distinct real experts) of every token and layer, in trace order."""
    for row in rows:
        for layer in range(ctx.n_layers):
            yield row, layer, _distinct(real(row.experts[layer], ctx.n_experts))


def _pinned(counter, capacity, keys):
    """The `capacity` keys of `keys` used most often (ties, unused keys included: the lower key)."""
    return set(sorted(keys, key=lambda x: (-counter[x], _order(x)))[:capacity])


def compute_static(shards, ctx, *, policy: str, capacity: int, scope: str = "layer") -> dict:
    """compute() for a pinned cache: "static" (the keys most used by the other fold of documents, per layer
    or over all layers) or "static-oracle" (those most used by the evaluated phase's own lookups)."""
    rows = list(token_rows(shards))
    learned = {}  # (fold or phase, cache) -> Counter of keys
    for row, layer, experts in _lookups(rows, ctx):
        group = fold(row) if policy == "static" else int(row.generated)
        cache = layer if scope == "layer" else "all"
        for e in experts:
            learned.setdefault((group, cache), Counter())[e if scope == "layer" else (layer, e)] += 1
    keys = range(ctx.n_experts) if scope == "layer" else [(l, e) for l in range(ctx.n_layers) for e in range(ctx.n_experts)]
    sets = {}  # (group, cache) -> pinned keys
    counts, fetched = {}, Counter()
    for row, layer, experts in _lookups(rows, ctx):
        group = 1 - fold(row) if policy == "static" else int(row.generated)
        cache = (group, layer if scope == "layer" else "all")
        if cache not in sets:
            sets[cache] = _pinned(learned.get(cache, Counter()), capacity, keys)
        pinned = sets[cache]
        cell = counts.setdefault((int(row.generated), layer), [0, 0, 0, 0])
        for e in experts:
            cell[0] += 1
            if (e if scope == "layer" else (layer, e)) in pinned:
                cell[1] += 1
            else:
                fetched[(layer, e)] += 1
    return {"counts": counts, "fetched": fetched}


def coverage(shards, ctx, window: int) -> dict:
    """{(phase, layer): {lookups, effective_experts, experts_for_50/90/99, windows, working_set}}: working set =
    mean distinct experts over full windows of `window` consecutive tokens of one sequence and phase."""
    import math

    rows = list(token_rows(shards))
    used = {}  # (phase, layer) -> Counter
    for row, layer, experts in _lookups(rows, ctx):
        used.setdefault((int(row.generated), layer), Counter()).update(experts)
    segments, prev = [], None  # runs of consecutive positions of one sequence and phase
    for row in rows:
        if not (is_next_position(prev, row) and prev.generated == row.generated):
            segments.append([])
        segments[-1].append(row)
        prev = row
    distinct = {}  # (phase, layer) -> distinct experts of every full window
    for segment in segments:
        for start in range(0, len(segment) - window + 1, window):
            chunk = segment[start:start + window]
            for layer in range(ctx.n_layers):
                seen = {e for row in chunk for e in real(row.experts[layer], ctx.n_experts)}
                distinct.setdefault((int(chunk[0].generated), layer), []).append(len(seen))
    out = {}
    for phase in (0, 1):
        for layer in range(ctx.n_layers):
            counter = used.get((phase, layer), Counter())
            total = sum(counter.values())
            ordered = sorted(counter.values(), reverse=True)
            cell = {"lookups": total,
                    "effective_experts": math.exp(-sum(n / total * math.log(n / total) for n in ordered)) if total else math.nan}
            for share in (50, 90, 99):
                need, covered = 0, 0
                while total and 100 * covered < share * total:
                    covered += ordered[need]
                    need += 1
                cell[f"experts_for_{share}"] = need
            sizes = distinct.get((phase, layer), [])
            cell["windows"] = len(sizes)
            cell["working_set"] = sum(sizes) / len(sizes) if sizes else math.nan
            out[(phase, layer)] = cell
    return out


def compute_lossy(shards, ctx, *, knob: str, value: float, capacity: int) -> dict:
    """{(phase, layer): [lookups, used, hits, token_layers, discarded]} and fetched Counter {(layer, expert): n} of
    an LRU cache per (sequence, layer) whose contents decide the routing (see simulate/lossy.py)."""
    import math

    E, L, k = ctx.n_experts, ctx.n_layers, ctx.top_k
    rows, prev, runs = list(token_rows(shards)), None, []
    for row in rows:
        if not is_next_position(prev, row):
            runs.append([])
        runs[-1].append(row)
        prev = row
    counts, fetched = {}, Counter()
    for run in runs:
        for layer in range(L):
            cache = OrderedDict()  # least recently used first
            for row in run:
                slots = [(e, w) for e, w in zip(row.experts[layer], row.weights[layer])]
                original, seen = [], set()
                for e, w in slots:
                    if 0 <= e < E and e not in seen:
                        original.append((e, w))
                        seen.add(e)
                total = sum(w for _, w in original)
                share = {e: w / total for e, w in original} if total else {e: math.nan for e, _ in original}
                if knob == "rerank":
                    probs = row.router[layer][:E]
                    score = [math.log(x) if ctx.router_output_kind == "probs" else x for x in probs]
                    if ctx.router_output_kind != "probs":
                        top = max(score)
                        score = [x - top for x in score]
                    score = [s + (value if e in cache else 0.0) for e, s in enumerate(score)]
                    used = sorted(range(E), key=lambda e: (-score[e], e))[:len(original)]
                elif knob == "drop-cold":
                    used = [e for e, _ in original if e in cache or not share[e] < value / k]
                    if original and not used:
                        used = [max(original, key=lambda x: share[x[0]])[0]]
                elif knob == "topk":
                    ranked = sorted(range(len(original)), key=lambda i: (-share[original[i][0]], i))[:int(value)]
                    used = [original[i][0] for i in sorted(ranked)]
                else:
                    used = [e for e, _ in original]
                discarded = sum(share[e] for e, _ in original if e not in used)
                hits = [e in cache for e in used]
                for e, hit in zip(used, hits):
                    if not hit:
                        if len(cache) >= capacity:
                            del cache[next(x for x in cache if x not in used)]
                        cache[e] = None
                        fetched[(int(row.generated), layer, e)] += 1
                for e in reversed(used):  # the first slot ends up the most recent
                    cache.move_to_end(e)
                cell = counts.setdefault((int(row.generated), layer), [0, 0, 0, 0, 0.0])
                cell[0] += len(original)
                cell[1] += len(used)
                cell[2] += sum(hits)
                cell[3] += 1
                cell[4] += discarded
    return {"counts": counts, "fetched": fetched}
