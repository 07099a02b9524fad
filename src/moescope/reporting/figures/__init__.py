"""Figures of the report: pure functions from result tables (pandas DataFrames) to matplotlib Figures.

    load.py      expert load bars, layer x expert heatmap, load histogram, per-layer balance, aux losses
    router.py    router weight norms/variance/cosine similarity; gate weights, entropy, what-if top-k
    routing.py   co-activation, cross-layer transitions and predictor recall, expert cache, temporal locality
    domains.py   per-domain load, divergence between domains, the code-vs-math difference map
    tokens.py    vocabulary specialisation, expert size per token, cost per token
    quant.py     quality vs bits / weight error, routing flips per layer, local vs end-to-end
    simulate.py  placement balancedness, GPU-load heatmaps, staleness; cache hit rate vs size, stall vs bandwidth
    _base.py     the fixed style, deterministic SVG/PNG rendering, readable layer/expert axes

No function here reads files or writes anything; `render_svg` / `render_png` turn a Figure into bytes.
"""

from moescope.reporting.figures import domains, load, quant, router, routing, simulate, tokens
from moescope.reporting.figures._base import facet_layers, render_png, render_svg, style

__all__ = ["domains", "facet_layers", "load", "quant", "render_png", "render_svg", "router", "routing", "simulate", "style", "tokens"]
