"""Domain figures: per-domain expert load, divergence between domains, the code-vs-math difference map.

Inputs: `domain_specialisation` tables (`distributions`: domain, layer, expert, count, share;
`divergence`: domain_a, domain_b, layer, js_divergence; `pair_comparison`: layer, expert, share_<a>,
share_<b>, difference).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from moescope.reporting.figures._base import (
    EXPECTED_COLOR,
    OVERALL,
    PALETTE,
    figure_function,
    full_matrix,
    heatmap,
    index_ticks,
    layer_axis,
    new_figure,
    percent_axis,
    ratio_colorbar,
    ratio_norm,
)

MAX_GROUPED_EXPERTS = 32


@figure_function
def domain_load(distributions: pd.DataFrame, layers: Sequence[int], n_experts: int) -> Figure:
    """Each domain's share of a layer's slots per expert (grouped bars; a log-ratio map beyond 32 experts)."""
    domains = sorted(distributions["domain"].astype(str).unique())
    grouped = n_experts <= MAX_GROUPED_EXPERTS
    fig, axes = new_figure(len(layers), 1, height=(1.0 + 1.9 * len(layers)) if grouped else (0.8 + (0.5 + 0.25 * len(domains)) * len(layers)))
    image = None
    for ax, layer in zip(axes[:, 0], layers):
        rows = distributions[distributions["layer"] == layer]
        share = np.stack([full_matrix(rows[rows["domain"].astype(str) == d].assign(zero=0), "zero", "expert", "share", 1, n_experts, fill=0.0)[0]
                          for d in domains])  # [D, E]
        if grouped:
            width = 0.8 / len(domains)
            for i, domain in enumerate(domains):
                ax.bar(np.arange(n_experts) - 0.4 + width * (i + 0.5), share[i], width=width, color=PALETTE[i % len(PALETTE)],
                       label=domain, linewidth=0)
            ax.axhline(1.0 / n_experts, color=EXPECTED_COLOR, linestyle="--", linewidth=1, label="expected (1/E)")
            index_ticks(ax, "x", list(range(n_experts)), max_ticks=32)
            ax.set_xlim(-0.6, n_experts - 0.4)
            ax.set_xlabel("expert")
            ax.set_ylabel("share of the domain's slots")
            percent_axis(ax)
        else:
            with np.errstate(divide="ignore"):
                log_ratio = np.log2(share * n_experts)
            norm = ratio_norm(log_ratio)
            image = heatmap(ax, np.clip(np.where(np.isneginf(log_ratio), np.nan, log_ratio), norm.vmin, norm.vmax),
                            row_labels=domains, col_labels=list(range(n_experts)), cmap="RdBu_r", norm=norm, annotate=False,
                            bad_color="#111111")
            ax.set_xlabel("expert")
        ax.set_title(f"layer {layer}", loc="left")
    if grouped:
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside upper right", ncols=len(labels))
    elif image is not None:
        ratio_colorbar(fig, image, axes[:, 0].tolist(), "share / expected (black: never)")
    return fig


@figure_function
def domain_divergence(divergence: pd.DataFrame) -> Figure:
    """Jensen-Shannon divergence (bits) between the expert distributions of each pair of domains, per layer."""
    fig, axes = new_figure(1, 1, height=2.9)
    ax = axes[0, 0]
    frame = divergence.assign(pair=divergence["domain_a"].astype(str) + " vs " + divergence["domain_b"].astype(str))
    layers = sorted(int(l) for l in frame["layer"].unique() if l != OVERALL)
    for i, pair in enumerate(sorted(frame["pair"].unique())):
        rows = frame[(frame["pair"] == pair) & (frame["layer"] != OVERALL)].sort_values("layer")
        overall = frame[(frame["pair"] == pair) & (frame["layer"] == OVERALL)]["js_divergence"]
        label = pair + (f" (mean {float(overall.iloc[0]):.3f})" if len(overall) else "")
        ax.plot(rows["layer"].astype(int), rows["js_divergence"].astype(float), marker="o" if len(rows) <= 40 else None,
                markersize=3, color=PALETTE[i % len(PALETTE)], label=label)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("JS divergence (bits; 1 = disjoint experts)")
    ax.set_title("How differently domains are routed, per layer", loc="left")
    layer_axis(ax, layers)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


@figure_function
def domain_pair_difference(pair: pd.DataFrame, domain_a: str, domain_b: str) -> Figure:
    """Share of domain a minus share of domain b, every layer and expert (percentage points)."""
    layers = sorted(pair["layer"].unique())
    E = int(pair["expert"].max()) + 1
    frame = pair.assign(row=pair["layer"].map({l: i for i, l in enumerate(layers)}))
    diff = full_matrix(frame, "row", "expert", "difference", len(layers), E) * 100.0
    span = max(float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 1.0, 1e-6)
    height = float(np.clip(1.3 + 0.16 * len(layers), 2.2, 9.0))
    fig, axes = new_figure(1, 1, height=height)
    ax = axes[0, 0]
    heatmap(ax, diff, row_labels=layers, col_labels=list(range(E)), cmap="PuOr_r", norm=TwoSlopeNorm(0.0, -span, span),
            fmt="{:+.1f}", colorbar_label=f"{domain_a} − {domain_b} (points)")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"{domain_a} vs {domain_b}: which experts each prefers (orange: {domain_a}, purple: {domain_b})", loc="left")
    return fig
