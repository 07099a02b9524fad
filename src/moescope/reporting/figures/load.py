"""Expert load figures: bars against the expected share, the layer x expert heatmap, histograms, per-layer balance.

Inputs are the `load` tables (`per_expert`: layer, expert, count, share, expected_share,
load_over_expected, status; `per_layer`: layer, balance_score, max_over_mean, load_entropy_norm, ...)
and the `aux_losses` per-layer table.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from moescope.reporting.figures._base import (
    EXPECTED_COLOR,
    PALETTE,
    STATUS_COLORS,
    figure_function,
    full_matrix,
    heatmap,
    layer_axis,
    line_handle,
    new_figure,
    percent_axis,
    ratio_colorbar,
    ratio_norm,
    sorted_bars,
    split_overall,
)

STATUS_ORDER = ("overloaded", "ok", "underused", "dead")
STATUS_LABELS = {"overloaded": "overloaded", "ok": "within thresholds", "underused": "under-used", "dead": "dead (no load)"}


@figure_function
def load_bars(per_expert: pd.DataFrame, layers: Sequence[int]) -> Figure:
    """Share of each layer's routing slots per expert, for `layers`, against the expected share 1/E."""
    n_experts = int(per_expert["expert"].nunique())
    ncols = 2 if n_experts <= 16 and len(layers) > 1 else 1  # few experts: bars side by side
    nrows = -(-len(layers) // ncols)
    fig, axes = new_figure(nrows, ncols, height=1.2 + 1.9 * nrows, sharey=True)
    for ax in axes.ravel()[len(layers):]:
        ax.set_visible(False)
    seen = set()
    for ax, layer in zip(axes.ravel(), layers):
        rows = per_expert[per_expert["layer"] == layer].sort_values("expert", kind="stable")
        status = rows["status"].astype(str).to_numpy()
        seen.update(status)
        order = sorted_bars(ax, rows["share"].to_numpy(), [STATUS_COLORS.get(s, "#999999") for s in status])
        dead = np.flatnonzero(status[order] == "dead")  # bar positions of dead experts: no bar to see, so mark them
        if dead.size:
            ax.plot(dead, np.zeros(dead.size), linestyle="none", marker="x", color=STATUS_COLORS["dead"], markersize=6, clip_on=False)
        expected = float(rows["expected_share"].iloc[0]) if len(rows) else np.nan
        ax.axhline(expected, color=EXPECTED_COLOR, linestyle="--", linewidth=1.2)
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("share of slots")
        percent_axis(ax)
        n_flagged = int(np.isin(status, ("overloaded", "underused", "dead")).sum())
        ax.set_title(f"layer {layer}: {n_flagged} of {len(rows)} experts flagged", loc="left")
    handles = [Patch(color=STATUS_COLORS[s], label=STATUS_LABELS[s]) for s in STATUS_ORDER if s in seen]
    handles.append(line_handle(EXPECTED_COLOR, "expected share (1/E)"))
    fig.legend(handles=handles, loc="outside upper right", ncols=len(handles))
    return fig


@figure_function
def load_heatmap(per_expert: pd.DataFrame) -> Figure:
    """Layer x expert map of load / expected load (log scale, x1 = balanced; black = dead)."""
    layers = sorted(per_expert["layer"].unique())
    E = int(per_expert["expert"].max()) + 1
    row_of = {layer: i for i, layer in enumerate(layers)}
    frame = per_expert.assign(row=per_expert["layer"].map(row_of))
    ratio = full_matrix(frame, "row", "expert", "load_over_expected", len(layers), E)
    with np.errstate(divide="ignore"):
        log_ratio = np.log2(ratio)
    dead = np.isneginf(log_ratio)
    height = float(np.clip(1.3 + 0.16 * len(layers), 2.2, 9.0))
    fig, axes = new_figure(1, 1, height=height)
    ax = axes[0, 0]
    norm = ratio_norm(log_ratio)
    image = heatmap(ax, np.where(dead, np.nan, np.clip(log_ratio, norm.vmin, norm.vmax)), row_labels=layers,
                    col_labels=list(range(E)), cmap="RdBu_r", norm=norm, bad_color="#111111", annotate=False)
    if ratio.size <= 144:  # few cells: print the multiple in each
        for (r, c), value in np.ndenumerate(ratio):
            if np.isfinite(value):
                ax.text(c, r, f"×{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(np.log2(max(value, 1e-9))) > 0.6 * norm.vmax else "black")
    ratio_colorbar(fig, image, ax, "load / expected")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    n_dead = int(dead.sum())
    ax.set_title(f"Load relative to balanced, every layer and expert ({n_dead} dead cells in black)", loc="left")
    return fig


@figure_function
def load_histogram(per_expert: pd.DataFrame) -> Figure:
    """How many (layer, expert) units carry each multiple of the expected load."""
    fig, axes = new_figure(1, 1, height=3.0)
    ax = axes[0, 0]
    ratio = per_expert["load_over_expected"].to_numpy(dtype=float)
    finite = ratio[np.isfinite(ratio)]
    top = max(2.0, float(finite.max()) * 1.02) if finite.size else 2.0
    bins = np.linspace(0.0, top, int(np.clip(finite.size // 3, 10, 60)) + 1)
    layers = sorted(per_expert["layer"].unique())
    if 1 < len(layers) <= 6:
        groups = [per_expert.loc[per_expert["layer"] == l, "load_over_expected"].to_numpy(dtype=float) for l in layers]
        ax.hist(groups, bins=bins, stacked=True, color=[PALETTE[i % len(PALETTE)] for i in range(len(layers))],
                label=[f"layer {l}" for l in layers], edgecolor="white", linewidth=0.3)
    else:
        ax.hist(finite, bins=bins, color=PALETTE[0], edgecolor="white", linewidth=0.3,
                label=f"{len(layers)} layers x {per_expert['expert'].nunique()} experts")
    ax.axvline(1.0, color=EXPECTED_COLOR, linestyle="--", linewidth=1.2, label="expected (x1)")
    counts = per_expert["status"].astype(str).value_counts()
    flagged = ", ".join(f"{counts.get(s, 0)} {STATUS_LABELS[s]}" for s in ("overloaded", "underused", "dead"))
    ax.set_title(f"Distribution of expert loads ({flagged})", loc="left")
    ax.set_xlabel("load / expected load")
    ax.set_ylabel("experts")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="upper right", ncols=2)
    return fig


@figure_function
def layer_balance(per_layer: pd.DataFrame) -> Figure:
    """Balance score, max/mean load and normalised load entropy per layer (dashed: pooled over layer x expert units)."""
    rows, overall = split_overall(per_layer)
    panels = (
        ("balance_score", "balance score (1 - CV)", 1.0),
        ("max_over_mean", "busiest expert / mean", 1.0),
        ("load_entropy_norm", "load entropy / ln E", 1.0),
    )
    fig, axes = new_figure(1, 3, height=2.8)
    for ax, (column, label, ideal) in zip(axes[0], panels):
        ax.plot(rows["layer"], rows[column], marker="o" if len(rows) <= 40 else None, markersize=3, color=PALETTE[0])
        if overall is not None and np.isfinite(overall[column]):
            ax.axhline(overall[column], color=PALETTE[1], linestyle="--", linewidth=1, label=f"pooled over layer × expert: {overall[column]:.3g}")
        ax.axhline(ideal, color="#888888", linestyle=":", linewidth=1, label="perfect balance")
        ax.set_title(label, loc="left")
        layer_axis(ax, rows["layer"].tolist())
        ax.legend(loc="best")
    return fig


@figure_function
def aux_losses_per_layer(per_layer: pd.DataFrame, top_k: int | None) -> Figure:
    """Switch load-balancing loss (balanced = k) and router z-loss per layer."""
    rows, overall = split_overall(per_layer)
    columns = [c for c in ("load_balancing_loss", "z_loss") if c in rows and rows[c].notna().any()]
    fig, axes = new_figure(1, max(len(columns), 1), height=2.8)
    titles = {"load_balancing_loss": "load-balancing loss E·Σ f·P", "z_loss": "router z-loss mean(logsumexp²)"}
    for ax, column in zip(axes[0], columns):
        ax.plot(rows["layer"], rows[column], marker="o" if len(rows) <= 40 else None, markersize=3, color=PALETTE[0])
        if overall is not None and np.isfinite(overall[column]):
            pooled = "pooled as transformers computes it" if column == "load_balancing_loss" else "all layers pooled"
            ax.axhline(overall[column], color=PALETTE[1], linestyle="--", linewidth=1, label=f"{pooled}: {overall[column]:.4g}")
        if column == "load_balancing_loss" and top_k:
            ax.axhline(top_k, color="#888888", linestyle=":", linewidth=1, label=f"perfectly balanced (= k = {top_k})")
        ax.set_title(titles[column], loc="left")
        layer_axis(ax, rows["layer"].tolist())
        ax.legend(loc="best")
    return fig
