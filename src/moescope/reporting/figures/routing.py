"""Figures of routing across tokens and layers: co-activation, cross-layer transitions and predictors,
expert-cache hit rates and temporal locality.

Inputs: `coactivation__pairs` (layer, expert_a, expert_b, count, rate, lift), `cross_layer__transitions`
(hop, source_layer, target_layer, expert_from, expert_to, count, p_to_given_from), `cross_layer__recall`
and `__recall_overall` (predictor, hop, [source_layer, target_layer,] hits, targets, recall),
`expert_cache` (predictor, layer, capacity, hits, lookups, hit_rate) and `temporal_locality`
(layer, same_first, same_first_chance, overlap, overlap_chance).
"""

from __future__ import annotations

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
    new_figure,
    percent_axis,
    ratio_colorbar,
    ratio_norm,
    split_overall,
)

PREDICTOR_LABELS = {
    "same_index": "same expert index",
    "transition": "most frequent transition",
    "previous_token": "previous token's experts",
    "router_lookahead": "next layer's router on this input",
    "popularity": "k most-loaded experts (static baseline)",
    "lru": "LRU cache only",
}
PREDICTOR_COLORS = {
    "same_index": PALETTE[0],
    "transition": PALETTE[1],
    "previous_token": PALETTE[2],
    "router_lookahead": PALETTE[3],
    "popularity": PALETTE[4],
    "lru": "#555555",
}


def _facet_grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return -(-n // cols), cols


@figure_function
def coactivation_heatmaps(pairs: pd.DataFrame, layers: Sequence[int], n_experts: int) -> Figure:
    """Lift of each expert pair (how much more often chosen together than independent choice predicts)."""
    nrows, ncols = _facet_grid(len(layers))
    fig, axes = new_figure(nrows, ncols, width=min(10.0, 2.7 * ncols + 1.2), height=0.4 + 2.8 * nrows)
    log_all = []
    matrices = []
    for layer in layers:
        rows = pairs[pairs["layer"] == layer]
        m = full_matrix(rows, "expert_a", "expert_b", "lift", n_experts, n_experts)
        m = np.where(np.isnan(m), m.T, m)
        with np.errstate(divide="ignore"):
            log_m = np.log2(m)
        log_m[np.isneginf(log_m)] = np.nan  # never together: drawn grey (as is the diagonal)
        matrices.append(log_m)
        log_all.append(log_m[np.isfinite(log_m)])
    norm = ratio_norm(np.concatenate(log_all) if log_all else np.zeros(0))
    image = None
    for i, (layer, log_m) in enumerate(zip(layers, matrices)):
        ax = axes[i // ncols, i % ncols]
        image = heatmap(ax, np.clip(log_m, norm.vmin, norm.vmax), row_labels=list(range(n_experts)),
                        col_labels=list(range(n_experts)), cmap="PuOr_r", norm=norm, annotate=False, bad_color="#bdbdbd", max_ticks=8)
        ax.set_title("all layers" if layer == OVERALL else f"layer {layer}", loc="left")
        ax.set_xlabel("expert")
        ax.set_ylabel("expert")
    for j in range(len(layers), nrows * ncols):
        axes[j // ncols, j % ncols].set_visible(False)
    if image is not None:
        ratio_colorbar(fig, image, axes.ravel().tolist(), "together / expected if independent")
    return fig


@figure_function
def transition_heatmaps(transitions: pd.DataFrame, sources: Sequence[int], n_experts: int, hop: int = 1) -> Figure:
    """P(expert j at layer N+hop | expert i at layer N), one matrix per source layer N."""
    nrows, ncols = _facet_grid(len(sources))
    fig, axes = new_figure(nrows, ncols, width=min(10.0, 2.7 * ncols + 1.2), height=0.4 + 2.8 * nrows)
    rows_hop = transitions[transitions["hop"] == hop]
    vmax = float(rows_hop["p_to_given_from"].max()) if len(rows_hop) else 1.0
    image = None
    for i, source in enumerate(sources):
        ax = axes[i // ncols, i % ncols]
        rows = rows_hop[rows_hop["source_layer"] == source]
        m = full_matrix(rows, "expert_from", "expert_to", "p_to_given_from", n_experts, n_experts, fill=0.0)
        image = heatmap(ax, m, row_labels=list(range(n_experts)), col_labels=list(range(n_experts)), cmap="magma_r",
                        vmin=0.0, vmax=vmax, annotate=False, max_ticks=8)
        target = int(rows["target_layer"].iloc[0]) if len(rows) else source + hop
        ax.set_title(f"layer {source} → {target}", loc="left")
        ax.set_xlabel(f"expert at layer {target}")
        ax.set_ylabel(f"expert at layer {source}")
    for j in range(len(sources), nrows * ncols):
        axes[j // ncols, j % ncols].set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9, pad=0.01, label="P(to | from)")
    return fig


@figure_function
def recall_vs_hop(recall_overall: pd.DataFrame, top_k: int, n_experts: int) -> Figure:
    """Share of layer N+hop's top-k set each predictor names, all layers pooled; dash-dotted: the static
    popularity baseline (the other fold's k most-loaded experts); dotted: k random experts."""
    fig, axes = new_figure(1, 1, height=3.1)
    ax = axes[0, 0]
    max_hop = int(recall_overall["hop"].max()) if len(recall_overall) else 1
    for predictor in ("same_index", "transition", "router_lookahead", "popularity"):
        rows = recall_overall[(recall_overall["predictor"] == predictor) & (recall_overall["hop"] >= 1)].sort_values("hop")
        if len(rows) and rows["recall"].notna().any():
            ax.plot(rows["hop"], rows["recall"], marker="o", color=PREDICTOR_COLORS[predictor], label=PREDICTOR_LABELS[predictor],
                    linestyle="-." if predictor == "popularity" else "-")
    prev = recall_overall[recall_overall["predictor"] == "previous_token"]
    if len(prev) and prev["recall"].notna().any():
        ax.axhline(float(prev["recall"].iloc[0]), color=PREDICTOR_COLORS["previous_token"], linestyle="--",
                   label=f"{PREDICTOR_LABELS['previous_token']} (same layer)")
    ax.axhline(min(top_k / n_experts, 1.0), color="#888888", linestyle=":", label=f"chance: k/E = {top_k}/{n_experts}")
    ax.set_xticks(range(1, max_hop + 1))
    ax.set_xlim(0.7, max_hop + 0.3)
    ax.set_ylim(0, 1)
    percent_axis(ax)
    ax.set_xlabel("hop: predicting layer N + hop from layer N")
    ax.set_ylabel(f"recall@{top_k}")
    ax.set_title("How much of the coming layer's expert set each predictor names", loc="left")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


@figure_function
def recall_per_layer(recall: pd.DataFrame, top_k: int) -> Figure:
    """Recall of each predictor per layer it predicts (hop 1; the previous-token predictor at the same layer)."""
    fig, axes = new_figure(1, 1, height=2.9)
    ax = axes[0, 0]
    targets = []
    for predictor in ("same_index", "transition", "router_lookahead", "previous_token", "popularity"):
        hop = 0 if predictor == "previous_token" else 1
        rows = recall[(recall["predictor"] == predictor) & (recall["hop"] == hop)].sort_values("target_layer")
        if len(rows) and rows["recall"].notna().any():
            ax.plot(rows["target_layer"], rows["recall"], marker="o" if len(rows) <= 40 else None, markersize=3,
                    color=PREDICTOR_COLORS[predictor], label=PREDICTOR_LABELS[predictor],
                    linestyle="-." if predictor == "popularity" else "-")
            targets.extend(rows["target_layer"].tolist())
    ax.set_ylim(0, 1)
    percent_axis(ax)
    ax.set_ylabel(f"recall@{top_k}")
    ax.set_title("Recall per predicted layer (hop 1)", loc="left")
    layer_axis(ax, sorted(set(targets)))
    ax.set_xlabel("predicted MoE layer")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


@figure_function
def cache_hit_rate(cache: pd.DataFrame, n_experts: int, top_k: int) -> Figure:
    """Hit rate of a per-layer expert cache against its size, for each predictor feeding it (band: layer range)."""
    fig, axes = new_figure(1, 1, height=3.2)
    ax = axes[0, 0]
    valid = cache[(cache["hits"] >= 0) & cache["hit_rate"].notna()]
    for predictor in ("lru", "popularity", "same_index", "transition", "previous_token", "router_lookahead"):
        rows = valid[valid["predictor"] == predictor]
        if not len(rows):
            continue
        overall = rows[rows["layer"] == OVERALL].sort_values("capacity")
        per_layer = rows[rows["layer"] != OVERALL].groupby("capacity", sort=True)["hit_rate"].agg(["min", "max"])
        color = PREDICTOR_COLORS.get(predictor, PALETTE[4])
        if len(per_layer) and per_layer["max"].gt(per_layer["min"]).any():
            ax.fill_between(per_layer.index, per_layer["min"], per_layer["max"], color=color, alpha=0.12, linewidth=0)
        ax.plot(overall["capacity"], overall["hit_rate"], color=color, marker="o" if len(overall) <= 24 else None,
                markersize=3, linestyle={"lru": "--", "popularity": "-."}.get(predictor, "-"), label=PREDICTOR_LABELS.get(predictor, predictor))
    ax.set_xlim(top_k - 0.3, n_experts + 0.3)
    ax.set_ylim(0, 1.02)
    percent_axis(ax)
    ax.set_xlabel(f"cache capacity (experts per layer; k = {top_k}, E = {n_experts})")
    ax.set_ylabel("hit rate")
    ax.set_title("Expert cache hit rate vs cache size (bands: spread over layers)", loc="left")
    ax.legend(loc="lower right")
    return fig


@figure_function
def temporal_locality(frame: pd.DataFrame) -> Figure:
    """Consecutive tokens sharing their first-choice expert / top-k experts, against the chance rate."""
    rows, overall = split_overall(frame)
    fig, axes = new_figure(1, 2, height=2.9)
    marker = "o" if len(rows) <= 40 else None
    for ax, (column, chance, title) in zip(
        axes[0],
        (("same_first", "same_first_chance", "Same first-choice expert as the previous token"),
         ("overlap", "overlap_chance", "Share of top-k experts kept from the previous token")),
    ):
        ax.plot(rows["layer"], rows[column], marker=marker, markersize=3, color=PALETTE[0], label="observed")
        ax.plot(rows["layer"], rows[chance], marker=marker, markersize=3, color="#888888", linestyle="--", label="chance (independent tokens)")
        if overall is not None and overall[chance] > 0:
            ax.text(0.01, 0.97, f"all layers: {overall[column]:.1%} vs {overall[chance]:.1%} chance (×{overall[column] / overall[chance]:.2f})",
                    transform=ax.transAxes, va="top", fontsize=8)
        ax.set_ylim(0, max(1e-9, float(np.nanmax(rows[[column, chance]].to_numpy(dtype=float)))) * 1.25)
        percent_axis(ax)
        ax.set_title(title, loc="left")
        layer_axis(ax, rows["layer"].tolist())
        ax.legend(loc="lower right")
    return fig
