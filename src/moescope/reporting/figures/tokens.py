"""Token figures: vocabulary specialisation, and for variable-size experts the size and cost of each token.

Inputs: `token_specialisation__tokens` (token_id, token, occurrences, top1_share, entropy_norm,
[avg_expert_size, flops_per_token], layer_<l>...), per-(token, layer) average sizes built by the section
from `token_specialisation__token_experts` and the trace's expert sizes, and `token_cost` tables
(`distribution`: size_sum, flops, count, share, mean_output_entropy; `per_layer`: layer,
mean_selected_size, large_share, mostly_large_share, mean_flops).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from moescope.reporting.figures._base import (
    PALETTE,
    figure_function,
    layer_axis,
    line_handle,
    new_figure,
    no_data,
    percent_axis,
    split_overall,
)

SMALL_COLOR, LARGE_COLOR, MEAN_COLOR = "#0072B2", "#D55E00", "#009E73"


@figure_function
def token_specialisation(tokens: pd.DataFrame, *, top_k: int, baseline_top1: float | None, baseline_entropy: float | None,
                         min_count: int) -> Figure:
    """How concentrated each token's routing is, weighted by occurrences (tokens seen >= min_count times).

    A token's busiest expert holds at most one of its k slots per occurrence, so that share is at most 1/k.
    """
    frequent = tokens[tokens["occurrences"] >= min_count]
    fig, axes = new_figure(1, 2, height=2.9)
    panels = (
        ("top1_share", "busiest expert's share of the token's slots", baseline_top1, (0.0, 1.0 / max(top_k, 1))),
        ("entropy_norm", "entropy of the token's expert counts / ln E", baseline_entropy, (0.0, 1.0)),
    )
    for ax, (column, label, baseline, span) in zip(axes[0], panels):
        if not len(frequent):
            no_data(ax, f"no token occurs {min_count}+ times")
            continue
        weights = frequent["occurrences"].to_numpy(dtype=float)
        ax.hist(frequent[column].to_numpy(dtype=float), bins=np.linspace(*span, 41), weights=weights / weights.sum(),
                color=PALETTE[0], edgecolor="white", linewidth=0.3)
        if baseline is not None and np.isfinite(baseline):
            ax.axvline(baseline, color=PALETTE[3], linestyle="--", label=f"routed like the layer: {baseline:.2f}")
            ax.legend(loc="upper right")
        ax.set_xlabel(label)
        ax.set_ylabel("share of occurrences")
        percent_axis(ax)
    axes[0, 0].set_title(f"Concentration ({len(frequent):,} tokens seen ≥ {min_count}×)", loc="left")
    axes[0, 1].set_title("Spread (0 = always the same experts)", loc="left")
    return fig


def _size_lines(ax, sizes: np.ndarray, weights: np.ndarray | None, small: float, large: float) -> None:
    ax.axvline(small, color=SMALL_COLOR, linestyle="--", linewidth=1.2)
    ax.axvline(large, color=LARGE_COLOR, linestyle="--", linewidth=1.2)
    mean = float(np.average(sizes, weights=weights)) if sizes.size else np.nan
    ax.axvline(mean, color=MEAN_COLOR, linestyle="--", linewidth=1.2)
    ax.legend(handles=[line_handle(SMALL_COLOR, f"smallest expert ({small:g})"), line_handle(LARGE_COLOR, f"largest expert ({large:g})"),
                       line_handle(MEAN_COLOR, f"mean ({mean:.0f})")], loc="upper right", frameon=True, framealpha=0.9, edgecolor="none")


@figure_function
def expert_size_histograms(avg_size: np.ndarray, occurrences: np.ndarray, *, small: float, large: float, threshold: float,
                           scope: str = "all layers") -> Figure:
    """Average selected expert size per token: by unique token, by occurrences, and the large/small split."""
    avg_size = np.asarray(avg_size, dtype=float)
    occurrences = np.asarray(occurrences, dtype=float)
    keep = np.isfinite(avg_size)
    avg_size, occurrences = avg_size[keep], occurrences[keep]
    bins = np.linspace(min(small, avg_size.min(initial=small)), max(large, avg_size.max(initial=large)), 51)
    fig, axes = new_figure(1, 3, height=3.1, width_ratios=(1.0, 1.0, 0.7))
    ax = axes[0, 0]
    ax.hist(avg_size, bins=bins, color=SMALL_COLOR, alpha=0.75, edgecolor="white", linewidth=0.3)
    _size_lines(ax, avg_size, None, small, large)
    ax.set_xlabel(f"average expert size per token ({scope})")
    ax.set_ylabel("unique tokens")
    ax.set_title("By unique token (unweighted)", loc="left")
    ax = axes[0, 1]
    ax.hist(avg_size, bins=bins, weights=occurrences, color=PALETTE[1], alpha=0.85, edgecolor="white", linewidth=0.3)
    _size_lines(ax, avg_size, occurrences, small, large)
    ax.set_xlabel(f"average expert size per token ({scope})")
    ax.set_ylabel("token occurrences")
    ax.set_title("By occurrence (weighted)", loc="left")
    ax = axes[0, 2]
    large_tok = avg_size > threshold
    shares = {
        "unique tokens": large_tok.mean() if avg_size.size else np.nan,
        "occurrences": occurrences[large_tok].sum() / occurrences.sum() if occurrences.sum() else np.nan,
    }
    y = np.arange(len(shares))
    values = np.array(list(shares.values()))
    ax.barh(y, values, color=LARGE_COLOR, label=f"average over all layers > {threshold:g}")
    ax.barh(y, 1 - values, left=values, color=SMALL_COLOR, label=f"average over all layers ≤ {threshold:g}")
    for yi, v in zip(y, values):
        if np.isfinite(v):
            ax.text(0.02, yi, f"{v:.1%} above", va="center", color="white", fontsize=8, fontweight="bold")
    ax.set_yticks(y, list(shares))
    ax.set_xlim(0, 1)
    percent_axis(ax, "x")
    ax.grid(False)
    ax.set_title("Large vs small experts", loc="left")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=1)
    return fig


@figure_function
def expert_size_by_layer(token_layer: pd.DataFrame, layers: Sequence[int], sizes: Mapping[int, Sequence[int]],
                         mostly_large: Mapping[int, float] | None = None) -> Figure:
    """Per layer: average selected expert size of each token, weighted by occurrences (columns token_id,
    layer, avg_size, occurrences); titled with the layer's share of (token, layer) pairs mostly on large experts
    (token_cost's `mostly_large_share`), when given."""
    ncols = min(len(layers), 4)
    fig, axes = new_figure(1, ncols, height=2.8)
    for ax, layer in zip(axes[0], layers):
        rows = token_layer[token_layer["layer"] == layer]
        layer_sizes = np.asarray(sizes.get(layer) or [0], dtype=float)
        small, large = float(layer_sizes.min()), float(layer_sizes.max())
        if not len(rows):
            no_data(ax, "no tokens")
            continue
        bins = np.linspace(small, large if large > small else small + 1, 41)
        ax.hist(rows["avg_size"].to_numpy(float), bins=bins, weights=rows["occurrences"].to_numpy(float), color=PALETTE[1],
                alpha=0.85, edgecolor="white", linewidth=0.3)
        share = (mostly_large or {}).get(layer)
        ax.set_title(f"layer {layer}: {share:.0%} mostly large" if share is not None else f"layer {layer}", loc="left")
        ax.set_xlabel("average expert size per token")
    axes[0, 0].set_ylabel("token occurrences")
    return fig


@figure_function
def token_cost(distribution: pd.DataFrame, per_layer: pd.DataFrame, headline: Mapping) -> Figure:
    """Expert FLOPs per token (or summed expert size without a hidden size), and the large-expert share per layer."""
    use_flops = distribution["flops"].notna().any()
    x_col = "flops" if use_flops else "size_sum"
    unit = 1e6 if use_flops else 1.0
    dist = distribution.sort_values(x_col, kind="stable")
    has_entropy = "mean_output_entropy" in dist and dist["mean_output_entropy"].notna().any()
    fig, axes = new_figure(1, 3 if has_entropy else 2, height=3.0)
    ax = axes[0, 0]
    values = dist[x_col].to_numpy(float) / unit  # distinct costs, ascending
    share = dist["share"].to_numpy(float)
    if values.size <= 60:  # few distinct costs (sums of a few expert sizes): one bar each
        gap = float(np.diff(values).min()) if values.size > 1 else 1.0
        ax.bar(values, share, width=0.8 * gap, color=PALETTE[0], linewidth=0)
    else:
        bins = np.linspace(values.min(), values.max() if values.max() > values.min() else values.min() + 1, 41)
        ax.hist(values, bins=bins, weights=share, color=PALETTE[0], edgecolor="white", linewidth=0.3)
    mean = float(np.average(values, weights=dist["count"].to_numpy(float))) if values.size else np.nan
    ax.axvline(mean, color=MEAN_COLOR, linestyle="--", label=f"mean {mean:,.3g}")
    dense = headline.get("dense_equivalent_flops_per_token")
    if use_flops and dense is not None and np.isfinite(dense):
        ax.axvline(dense / unit, color=PALETTE[3], linestyle=":", label=f"dense equivalent {dense / unit:,.3g}")
    ax.set_xlabel("expert MFLOPs per token (all layers)" if use_flops else "summed selected expert size per token")
    ax.set_ylabel("share of tokens")
    percent_axis(ax)
    fraction = headline.get("fraction_of_dense")
    title = "Cost per token" + (f" ({fraction:.0%} of dense)" if fraction is not None and np.isfinite(fraction) else "")
    ax.set_title(title, loc="left")
    ax.legend(loc="upper right", frameon=True, framealpha=0.9, edgecolor="none")
    ax = axes[0, 1]
    rows, overall = split_overall(per_layer)
    marker = "o" if len(rows) <= 40 else None
    ax.plot(rows["layer"], rows["large_share"], marker=marker, markersize=3, color=LARGE_COLOR, label="slots on large experts")
    ax.plot(rows["layer"], rows["mostly_large_share"], marker=marker, markersize=3, color=PALETTE[4], label="tokens mostly on large experts")
    ax.set_ylim(0, 1)
    percent_axis(ax)
    ax.set_title("Large-expert share per layer", loc="left")
    layer_axis(ax, rows["layer"].tolist())
    ax.legend(loc="best")
    if has_entropy:
        ax = axes[0, 2]
        rows = dist[dist["mean_output_entropy"].notna()]
        ax.scatter(rows[x_col].to_numpy(float) / unit, rows["mean_output_entropy"], s=8 + 60 * rows["share"] / max(rows["share"].max(), 1e-12),
                   color=PALETTE[2], alpha=0.7, linewidths=0)
        r = headline.get("flops_entropy_pearson")
        ax.set_title("Output entropy vs cost" + (f" (r = {r:+.2f})" if r is not None and np.isfinite(r) else ""), loc="left")
        ax.set_xlabel(axes[0, 0].get_xlabel())
        ax.set_ylabel("mean next-token entropy (nats)")
    return fig
