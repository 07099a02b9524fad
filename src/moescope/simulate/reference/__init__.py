"""Slow, obviously-correct per-event versions of the simulations (plain Python loops, dicts and lists), to
check the vectorised ones (tests/simulate) and to time them against (bench/simulate.py). Nothing in
moescope calls them."""
