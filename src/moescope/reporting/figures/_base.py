"""What every figure shares: one fixed style, byte-stable rendering, and axes that stay readable at scale.

Figures are built on `matplotlib.figure.Figure` directly (no pyplot: no global figure registry to leak
into), inside `style()`, and rendered by `render_svg` / `render_png` with fixed metadata and hash salt so
the same tables give the same bytes. Layer and expert axes go through `index_ticks` (at most ~16 labels)
and per-layer detail is drawn for `facet_layers` (first, last and evenly spaced ones between).
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, TwoSlopeNorm
from matplotlib.figure import Figure

OVERALL = -1  # the `layer` value of pooled rows in every per-layer table

STYLE = {
    "svg.hashsalt": "moescope-report",  # stable ids in SVG output
    "svg.fonttype": "path",  # glyphs as paths: renders the same without the font installed
    "text.parse_math": False,  # model/domain names with $ are text, not mathtext
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.6,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "image.interpolation": "nearest",
    "figure.dpi": 100,
    "path.simplify": True,
}

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
STATUS_COLORS = {"ok": "#7f9fbf", "overloaded": "#D55E00", "underused": "#009E73", "dead": "#222222"}
EXPECTED_COLOR = "#C0392B"
WIDTH = 10.0  # inches of a full-width figure (shown at most 100% of the page width)
MAX_BARS = 64  # beyond this many experts, bars are sorted by value instead of by expert index


@contextmanager
def style():
    with matplotlib.rc_context(STYLE):
        yield


def figure_function(fn: Callable[..., Figure]) -> Callable[..., Figure]:
    """Run a figure-building function inside the report style."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> Figure:
        with style():
            fig = fn(*args, **kwargs)
            for ax in fig.axes:
                plain_log_labels(ax)
            return fig

    return wrapper


def _plain_number(value: float, _pos=None) -> str:
    return f"{value:g}" if value else "0"


def plain_log_labels(ax: Axes) -> None:
    """Log and symlog axes labelled 0.001, 0.01, ... (the default labels are mathtext, switched off here)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
        if scale in ("log", "symlog") and not isinstance(axis.get_major_formatter(), FuncFormatter):
            axis.set_major_formatter(FuncFormatter(_plain_number))
            axis.set_minor_formatter(NullFormatter())


def new_figure(nrows: int = 1, ncols: int = 1, *, width: float = WIDTH, height: float = 3.2, **kwargs) -> tuple[Figure, np.ndarray]:
    """A constrained-layout figure and its axes as a 2-D array [nrows, ncols]."""
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def render_svg(fig: Figure) -> bytes:
    with style():
        buf = io.BytesIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    return buf.getvalue()


def render_png(fig: Figure, *, dpi: int = 150) -> bytes:
    with style():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def facet_layers(layers: Sequence[int], n: int = 4) -> list[int]:
    """Up to n layers to draw in detail: first, last and evenly spaced ones between (in order)."""
    layers = sorted(int(l) for l in layers if l != OVERALL)
    if len(layers) <= n:
        return layers
    picks = np.unique(np.round(np.linspace(0, len(layers) - 1, n)).astype(int))
    return [layers[i] for i in picks]


def tick_step(n: int, max_ticks: int = 16) -> int:
    """A round step (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100, ...) giving at most max_ticks labels."""
    need = max(1, math.ceil(n / max_ticks))
    for base in (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64):
        if base >= need:
            return base
    return 100 * math.ceil(need / 100)


def index_ticks(ax: Axes, axis: str, labels: Sequence, *, max_ticks: int = 16) -> None:
    """Label positions 0..n-1 of an axis with `labels`, thinned to a round step."""
    n = len(labels)
    positions = np.arange(0, n, tick_step(n, max_ticks))
    texts = [str(labels[i]) for i in positions]
    if axis == "x":
        ax.set_xticks(positions, texts)
    else:
        ax.set_yticks(positions, texts)


def heatmap(
    ax: Axes,
    matrix: np.ndarray,
    *,
    row_labels: Sequence,
    col_labels: Sequence,
    cmap: str | Colormap = "viridis",
    norm=None,
    vmin: float | None = None,
    vmax: float | None = None,
    bad_color: str = "#dddddd",
    annotate: bool | None = None,
    fmt: str = "{:.2f}",
    colorbar_label: str | None = None,
    max_ticks: int = 16,
):
    """imshow of matrix [rows, cols] with thinned index labels; NaN cells get `bad_color`.

    Cells are annotated with their values when there are few enough to read (<= 144).
    """
    cmap = matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap
    cmap = cmap.with_extremes(bad=bad_color)
    masked = np.ma.masked_invalid(np.asarray(matrix, dtype=float))
    image = ax.imshow(masked, aspect="auto", cmap=cmap, norm=norm, vmin=None if norm else vmin, vmax=None if norm else vmax)
    index_ticks(ax, "x", col_labels, max_ticks=max_ticks)
    index_ticks(ax, "y", row_labels, max_ticks=max_ticks)
    ax.grid(False)
    if annotate is None:
        annotate = masked.size <= 144
    if annotate:
        rows, cols = masked.shape
        for r in range(rows):  # at most 144 cells
            for c in range(cols):
                if masked.mask is not np.ma.nomask and masked.mask[r, c]:
                    continue
                value = float(masked[r, c])
                rgba = image.cmap(image.norm(value))
                light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.55
                ax.text(c, r, fmt.format(value), ha="center", va="center", fontsize=7, color="black" if light else "white")
    if colorbar_label is not None:
        bar = ax.figure.colorbar(image, ax=ax, shrink=0.9, pad=0.01)
        bar.set_label(colorbar_label)
    return image


def ratio_norm(log2_values: np.ndarray, *, floor: float = 1.0, cap: float = 4.0) -> TwoSlopeNorm:
    """Symmetric colour scale for log2 ratios around 0 (x1), spanning at least ±floor and at most ±cap."""
    finite = np.abs(log2_values[np.isfinite(log2_values)])
    span = float(np.clip(finite.max() if finite.size else floor, floor, cap))
    return TwoSlopeNorm(vcenter=0.0, vmin=-span, vmax=span)


def ratio_colorbar(fig: Figure, image, ax, label: str) -> None:
    """Colourbar for a log2-ratio image, labelled as multiples (x0.25, x0.5, x1, x2, x4)."""
    bar = fig.colorbar(image, ax=ax, shrink=0.9, pad=0.01)
    lo, hi = image.norm.vmin, image.norm.vmax
    ticks = [t for t in range(math.floor(lo), math.ceil(hi) + 1) if lo <= t <= hi]
    bar.set_ticks(ticks, labels=[f"×{2.0 ** t:g}" for t in ticks])
    bar.set_label(label)


def sorted_bars(ax: Axes, values: np.ndarray, colors: Sequence[str], *, annotate: int = 3, label_prefix: str = "e") -> np.ndarray:
    """Bars for values [E]: by index when E <= MAX_BARS, else sorted descending with the extremes labelled.

    Returns the expert index of each bar position.
    """
    values = np.asarray(values, dtype=float)
    n = values.size
    if n <= MAX_BARS:
        order = np.arange(n)
        ax.bar(order, values, color=list(colors), width=0.85, linewidth=0)
        index_ticks(ax, "x", order.tolist(), max_ticks=32)
        ax.set_xlabel("expert")
        ax.set_xlim(-0.6, n - 0.4)
        return order
    order = np.argsort(-np.nan_to_num(values, nan=-np.inf), kind="stable")
    ax.bar(np.arange(n), values[order], color=[colors[i] for i in order], width=1.0, linewidth=0)
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_xlabel(f"experts ranked by value ({n} experts; extremes labelled)")
    for rank in [*range(min(annotate, n)), *range(max(n - annotate, annotate), n)]:
        expert = int(order[rank])
        ax.annotate(f"{label_prefix}{expert}", (rank, values[expert]), xytext=(0, 2), textcoords="offset points",
                    ha="center", va="bottom", fontsize=6.5, rotation=90)
    ax.set_xticks([])
    return order


def layer_axis(ax: Axes, layers: Sequence[int], *, max_ticks: int = 12) -> None:
    """x axis of per-layer line plots: integer layer indices, thinned."""
    layers = list(layers)
    if not layers:
        return
    step = tick_step(len(layers), max_ticks)
    ax.set_xticks(layers[::step])
    ax.set_xlabel("MoE layer")
    pad = 0.5 if len(layers) < 4 else 0.02 * (max(layers) - min(layers) + 1)
    ax.set_xlim(min(layers) - pad, max(layers) + pad)


def percent_axis(ax: Axes, axis: str = "y") -> None:
    from matplotlib.ticker import PercentFormatter

    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(PercentFormatter(1.0, decimals=0))


def split_overall(frame, column: str = "layer"):
    """(per-layer rows sorted by layer, the OVERALL row or None)."""
    per_layer = frame[frame[column] != OVERALL].sort_values(column, kind="stable")
    overall = frame[frame[column] == OVERALL]
    return per_layer, (overall.iloc[0] if len(overall) else None)


def full_matrix(frame, row: str, col: str, value: str, n_rows: int, n_cols: int, *, fill: float = np.nan) -> np.ndarray:
    """Dense [n_rows, n_cols] matrix from long-table columns (missing cells get `fill`)."""
    matrix = np.full((n_rows, n_cols), fill, dtype=float)
    r = frame[row].to_numpy(dtype=np.int64)
    c = frame[col].to_numpy(dtype=np.int64)
    keep = (r >= 0) & (r < n_rows) & (c >= 0) & (c < n_cols)
    matrix[r[keep], c[keep]] = frame[value].to_numpy(dtype=float)[keep]
    return matrix


def line_handle(color: str, label: str, linestyle: str = "--", marker: str | None = None):
    """A legend entry for a line drawn with axhline/axvline or a style legend."""
    from matplotlib.lines import Line2D

    return Line2D([], [], color=color, linestyle=linestyle, linewidth=1.2, marker=marker, label=label)


def no_data(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666666")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
