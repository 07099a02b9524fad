"""Systems questions replayed on routing traces, offline: where experts should live (placement) and which
ones to keep in fast memory (offloading). Pure functions over load matrices and shards.

    placement.py  static / greedy / DeepSeek EPLB placements        balance.py    GPU loads, balancedness, fan-out
    staleness.py  window t's placement on window t + 1              cost.py       expert bytes, links, stall time
    streams.py    lookups laid out per cache and step               offload.py    prefetchers, counts, results
    priority_cache.py  the engine of lru.py, lfu.py, belady.py      arc.py        ARC
    reference/    per-event Python loops the tests and bench/simulate.py compare with
"""
