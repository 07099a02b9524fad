"""Router figures: weight structure (norms, variance, cosine similarity) and confidence (gate weights, entropy).

Inputs: `router_structure` tables (`per_expert`: layer, expert, norm, std, variance, ...; `pairs`: layer,
expert_a, expert_b, cosine) and `router_confidence` tables (`histograms`: quantity, layer, bin_lo, bin_hi,
count with an underflow and an overflow bin; `per_layer`: mean_* per layer; `what_if`: layer, top_k,
experts_used, max_share, mean_first_weight, std_first_weight).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from moescope.reporting.figures._base import (
    OVERALL,
    PALETTE,
    figure_function,
    full_matrix,
    heatmap,
    layer_axis,
    line_handle,
    new_figure,
    no_data,
    percent_axis,
    sorted_bars,
    split_overall,
)


# -- router weight structure -------------------------------------------------------------------------
@figure_function
def router_weight_stats(per_expert: pd.DataFrame, layers: Sequence[int]) -> Figure:
    """Per-expert L2 norm and standard deviation of the router row, for `layers` (dashed: layer mean)."""
    fig, axes = new_figure(len(layers), 2, height=1.0 + 1.9 * len(layers))
    for row, layer in enumerate(layers):
        rows = per_expert[per_expert["layer"] == layer].sort_values("expert", kind="stable")
        for col, (column, label, color) in enumerate((("norm", "L2 norm", PALETTE[0]), ("std", "standard deviation", PALETTE[3]))):
            ax = axes[row, col]
            values = rows[column].to_numpy(dtype=float)
            sorted_bars(ax, values, [color] * len(values))
            mean = float(np.nanmean(values)) if values.size else np.nan
            ax.axhline(mean, color="#333333", linestyle="--", linewidth=1, label=f"mean {mean:.3g}")
            lo = float(np.nanmin(values)) if values.size else 0.0
            hi = float(np.nanmax(values)) if values.size else 1.0
            if hi > lo:  # zoom in: differences between experts are what matters
                ax.set_ylim(max(0.0, lo - 0.25 * (hi - lo)), hi + 0.15 * (hi - lo))
            ax.set_title(f"layer {layer}: router weight {label} per expert", loc="left")
            ax.legend(loc="upper right")
    return fig


@figure_function
def router_weight_heatmaps(per_expert: pd.DataFrame) -> Figure:
    """Norm and standard deviation of every router row, layer x expert (for models with many layers)."""
    layers = sorted(per_expert["layer"].unique())
    E = int(per_expert["expert"].max()) + 1
    frame = per_expert.assign(row=per_expert["layer"].map({l: i for i, l in enumerate(layers)}))
    height = float(np.clip(1.3 + 0.14 * len(layers), 2.4, 8.0))
    fig, axes = new_figure(1, 2, height=height)
    for ax, (column, label) in zip(axes[0], (("norm", "L2 norm"), ("std", "standard deviation"))):
        matrix = full_matrix(frame, "row", "expert", column, len(layers), E)
        heatmap(ax, matrix, row_labels=layers, col_labels=list(range(E)), cmap="viridis", annotate=False, colorbar_label=label,
                max_ticks=10)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"router weight {label}", loc="left")
    return fig


def cosine_matrix(pairs: pd.DataFrame, layer: int, n_experts: int) -> np.ndarray:
    """Symmetric [E, E] cosine similarity of one layer's router rows (diagonal 1)."""
    rows = pairs[pairs["layer"] == layer]
    m = full_matrix(rows, "expert_a", "expert_b", "cosine", n_experts, n_experts)
    m = np.where(np.isnan(m), m.T, m)
    np.fill_diagonal(m, 1.0)
    return m


@figure_function
def cosine_matrices(pairs: pd.DataFrame, layers: Sequence[int], n_experts: int) -> Figure:
    """Cosine similarity between experts' router vectors, one matrix per layer in `layers`."""
    n = len(layers)
    fig, axes = new_figure(1, n, width=min(10.0, 3.0 * n + 1.0), height=3.3 if n > 1 else 4.0)
    off = pairs["cosine"].to_numpy(dtype=float)
    span = max(float(np.nanmax(np.abs(off))) if off.size else 1.0, 0.05)
    for i, (ax, layer) in enumerate(zip(axes[0], layers)):
        m = cosine_matrix(pairs, layer, n_experts)
        image = heatmap(ax, np.where(np.eye(n_experts, dtype=bool), np.nan, m), row_labels=list(range(n_experts)),
                        col_labels=list(range(n_experts)), cmap="RdBu_r", vmin=-span, vmax=span, annotate=n_experts <= 8,
                        bad_color="#ffffff", max_ticks=8)
        ax.set_title(f"layer {layer}", loc="left")
        ax.set_xlabel("expert")
        if i == 0:
            ax.set_ylabel("expert")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9, pad=0.01, label="cosine similarity (diagonal blank)")
    return fig


@figure_function
def cosine_by_layer(pairs: pd.DataFrame) -> Figure:
    """Mean and largest off-diagonal router cosine similarity per layer."""
    grouped = pairs.groupby("layer", sort=True)["cosine"].agg(["mean", "max", "min"]).reset_index()
    fig, axes = new_figure(1, 1, height=2.6)
    ax = axes[0, 0]
    ax.fill_between(grouped["layer"], grouped["min"], grouped["max"], color=PALETTE[0], alpha=0.15, label="min – max pair")
    ax.plot(grouped["layer"], grouped["mean"], color=PALETTE[0], marker="o" if len(grouped) <= 40 else None, markersize=3, label="mean pair")
    ax.axhline(0.0, color="#888888", linewidth=0.8)
    ax.set_ylabel("cosine similarity")
    ax.set_title("How alike the experts' router vectors are, per layer", loc="left")
    layer_axis(ax, grouped["layer"].tolist())
    ax.legend(loc="best")
    return fig


# -- router confidence -------------------------------------------------------------------------------
def _hist(histograms: pd.DataFrame, quantity: str, layer: int = OVERALL) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(edges [B+1], fraction of tokens per bin [B], underflow count, overflow count) of one histogram."""
    rows = histograms[(histograms["quantity"] == quantity) & (histograms["layer"] == layer)].sort_values("bin_lo", kind="stable")
    lo, hi, counts = rows["bin_lo"].to_numpy(float), rows["bin_hi"].to_numpy(float), rows["count"].to_numpy(float)
    inner = np.isfinite(lo) & np.isfinite(hi)
    total = max(counts.sum(), 1.0)
    edges = np.append(lo[inner], hi[inner][-1:]) if inner.any() else np.zeros(1)
    under = int(counts[np.isneginf(lo)].sum())
    over = int(counts[np.isposinf(hi)].sum())
    return edges, counts[inner] / total, under, over


def has_quantity(histograms: pd.DataFrame | None, quantity: str) -> bool:
    return histograms is not None and len(histograms) > 0 and bool((histograms["quantity"] == quantity).any())


@figure_function
def gate_weight_distributions(histograms: pd.DataFrame) -> Figure:
    """First vs second expert gate weight (renormalised over the top-k), and their ratio, all layers pooled."""
    fig, axes = new_figure(1, 2, height=3.0)
    ax = axes[0, 0]
    for quantity, label, color in (("top1_weight", "1st expert", PALETTE[2]), ("top2_weight", "2nd expert", PALETTE[3])):
        if has_quantity(histograms, quantity):
            edges, frac, _, _ = _hist(histograms, quantity)
            ax.stairs(frac, edges, fill=True, alpha=0.55, color=color, label=label)
    ax.set_xlabel("gate weight (top-k weights renormalised to sum 1)")
    ax.set_ylabel("share of tokens")
    percent_axis(ax)
    ax.set_title("Gate weight of the first and second expert", loc="left")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left")
    ax = axes[0, 1]
    if has_quantity(histograms, "weight_ratio"):
        edges, frac, _, over = _hist(histograms, "weight_ratio")
        ax.stairs(frac, edges, fill=True, color=PALETTE[4], alpha=0.8)
        ax.set_xscale("log")
        ax.axvline(1.0, color="#C0392B", linestyle="--", linewidth=1.2, label="equal weights")
        if over:
            ax.legend(handles=[line_handle("#C0392B", "equal weights"),
                               line_handle("none", f"{over:,} tokens beyond {edges[-1]:g} (2nd weight ≈ 0) not shown", "")],
                      loc="upper right")
        else:
            ax.legend(loc="upper right")
        ax.set_xlabel("1st / 2nd gate weight (log scale)")
        ax.set_ylabel("share of tokens")
        percent_axis(ax)
        ax.set_title("Ratio of first to second gate weight", loc="left")
    else:
        no_data(ax, "top-1 routing: no second expert")
    return fig


@figure_function
def router_distribution(histograms: pd.DataFrame, n_experts: int, top_k: int) -> Figure:
    """Routing entropy over all experts and the margin between the k-th and (k+1)-th expert."""
    fig, axes = new_figure(1, 2, height=2.9)
    ax = axes[0, 0]
    edges, frac, _, _ = _hist(histograms, "router_entropy")
    ax.stairs(frac, edges, fill=True, color=PALETTE[0], alpha=0.8)
    ax.axvline(math.log(n_experts), color="#888888", linestyle=":", label=f"uniform over {n_experts} (ln E)")
    if top_k > 1:
        ax.axvline(math.log(top_k), color=PALETTE[1], linestyle="--", label=f"uniform over k={top_k} (ln k)")
    ax.set_xlabel("entropy of the router distribution (nats)")
    ax.set_ylabel("share of tokens")
    percent_axis(ax)
    ax.set_title("Routing entropy", loc="left")
    ax.legend(loc="upper left")
    ax = axes[0, 1]
    if has_quantity(histograms, "margin"):
        edges, frac, _, _ = _hist(histograms, "margin")
        ax.stairs(frac, edges, fill=True, color=PALETTE[5], alpha=0.9)
        ax.set_xlabel(f"p(k-th) − p(k+1-th) expert, k = {top_k}")
        ax.set_ylabel("share of tokens")
        percent_axis(ax)
        ax.set_title("Margin: last chosen vs first rejected expert", loc="left")
    else:
        no_data(ax, "k = E: no rejected expert, no margin")
    return fig


@figure_function
def entropy_per_layer(per_layer: pd.DataFrame, n_experts: int, top_k: int) -> Figure:
    """Mean routing entropy per layer (when router outputs exist), and mean gate weights per layer."""
    rows, _ = split_overall(per_layer)
    has_router = "mean_router_entropy" in rows and rows["mean_router_entropy"].notna().any()
    fig, axes = new_figure(1, 2, height=2.9)
    ax = axes[0, 0]
    marker = "o" if len(rows) <= 40 else None
    if has_router:
        ax.plot(rows["layer"], rows["mean_router_entropy"], marker=marker, markersize=3, color=PALETTE[0], label="router distribution (all experts)")
        ax.axhline(math.log(n_experts), color="#888888", linestyle=":", label="ln E (uniform)")
    if "mean_selected_entropy" in rows and rows["mean_selected_entropy"].notna().any():
        ax.plot(rows["layer"], rows["mean_selected_entropy"], marker=marker, markersize=3, color=PALETTE[1], label="selected top-k weights")
        if top_k > 1:
            ax.axhline(math.log(top_k), color=PALETTE[1], linestyle=":", label="ln k (equal weights)")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("mean entropy (nats)")
    ax.set_title("Routing entropy per layer" + ("" if has_router else " (selected weights only)"), loc="left")
    layer_axis(ax, rows["layer"].tolist())
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")
    ax = axes[0, 1]
    for column, label, color in (("mean_top1_weight", "1st expert", PALETTE[2]), ("mean_top2_weight", "2nd expert", PALETTE[3])):
        if column in rows and rows[column].notna().any():
            ax.plot(rows["layer"], rows[column], marker=marker, markersize=3, color=color, label=label)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean renormalised gate weight")
    ax.set_title("Mean gate weight per layer", loc="left")
    layer_axis(ax, rows["layer"].tolist())
    ax.legend(loc="best")
    return fig


@figure_function
def what_if_top_k(what_if: pd.DataFrame, n_experts: int, top_k: int) -> Figure:
    """What top-m routing of the router distribution would do, all layers pooled, for each m simulated."""
    overall = what_if[what_if["layer"] == OVERALL].sort_values("top_k", kind="stable")
    per_layer = what_if[what_if["layer"] != OVERALL]
    fig, axes = new_figure(1, 2, height=2.8)
    ks = overall["top_k"].astype(int).tolist()
    x = np.arange(len(ks))
    colors = [PALETTE[1] if k == top_k else PALETTE[0] for k in ks]
    ax = axes[0, 0]
    ax.bar(x, overall["mean_first_weight"], yerr=overall["std_first_weight"], color=colors, capsize=3, width=0.6)
    ax.set_xticks(x, [f"top-{k}" + (" (model)" if k == top_k else "") for k in ks])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("first expert's weight (± std)")
    ax.set_title("First expert's share of the top-m weights", loc="left")
    ax = axes[0, 1]
    mean_used = per_layer.groupby("top_k", sort=True)["experts_used"].mean().reindex(ks)
    ax.bar(x, mean_used.to_numpy(dtype=float), color=colors, width=0.6)
    ax.axhline(n_experts, color="#888888", linestyle=":", label=f"all {n_experts} experts")
    ax.set_xticks(x, [f"top-{k}" for k in ks])
    ax.set_ylabel("experts used (mean over layers)")
    ax.set_title("Experts that receive any token", loc="left")
    ax.legend(loc="lower right")
    return fig
