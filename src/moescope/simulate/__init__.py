"""Expert offloading replayed on routing traces, offline: which experts to keep in fast memory, and what moving
the others costs. Pure functions over shards. This package sits above `moescope.analysis` (it uses its shard
view, LRU kernel and predictors); expert placement lives there (analysis/placement*.py).

    streams.py    lookups laid out per cache and step               offload.py    prefetchers, counts, results
    priority_cache.py  the engine of lru.py, lfu.py, belady.py      arc.py        ARC
    cost.py       expert bytes, links, stall time
    reference/    per-event Python loops the tests and bench/simulate.py compare with
"""
