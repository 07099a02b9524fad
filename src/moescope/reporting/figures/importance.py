"""Importance figures: ΔNLL per dropped expert, routing statistics against it, pruning curves, specialisation.

Inputs: the importance sweep's tables — `experts` (layer, expert, delta_nll, delta_nll_se, frequency,
mean_gate_weight, reap, delta_nll_<domain>...), `correlations` (statistic, layer [-1 = pooled], spearman),
`pruning` (criterion [none = unpruned], n_pruned, share_pruned, nll, delta_nll, delta_nll_se) and
`specialisation` (layer, domain, expert, delta_nll_domain, delta_nll_other_domains).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from moescope.reporting.figures._base import PALETTE, figure_function, new_figure

STATISTIC_LABELS = {"frequency": "routing frequency", "mean_gate_weight": "mean gate weight",
                    "reap": "REAP (gate weight × output norm)"}
CRITERION_COLORS = {"delta_nll": PALETTE[7], "frequency": PALETTE[0], "mean_gate_weight": PALETTE[1], "reap": PALETTE[2],
                    "random": "#999999"}


@figure_function
def delta_nll_map(experts: pd.DataFrame) -> Figure:
    """ΔNLL when each expert is dropped: MoE layers × experts, diverging around 0."""
    grid = experts.pivot(index="layer", columns="expert", values="delta_nll").sort_index()
    fig, axes = new_figure(1, 1, height=max(2.0, 0.45 * len(grid) + 1.2))
    ax = axes[0, 0]
    values = grid.to_numpy(float)
    limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_yticks(range(len(grid)), [str(l) for l in grid.index])
    ax.set_xticks(range(grid.shape[1]), [str(e) for e in grid.columns])
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.grid(False)
    ax.set_title("ΔNLL when the expert is dropped (nats/token)", loc="left")
    fig.colorbar(image, ax=ax, shrink=0.9)
    return fig


@figure_function
def statistics_vs_delta(experts: pd.DataFrame, correlations: pd.DataFrame) -> Figure:
    """Each routing statistic against ΔNLL, one dot per expert, with the pooled Spearman correlation."""
    stats = [s for s in STATISTIC_LABELS if s in experts and experts[s].notna().any()]
    fig, axes = new_figure(1, max(len(stats), 1), height=3.0)
    pooled = correlations[correlations.layer == -1].set_index("statistic")["spearman"]
    layers = sorted(experts.layer.unique())
    for ax, stat in zip(axes[0], stats):
        for i, layer in enumerate(layers):
            part = experts[experts.layer == layer]
            ax.scatter(part[stat], part["delta_nll"], s=14, color=PALETTE[i % len(PALETTE)], alpha=0.8, label=f"layer {layer}")
        ax.axhline(0, color="#888888", linewidth=0.8)
        ax.set_xlabel(STATISTIC_LABELS[stat])
        rho = pooled.get(stat, np.nan)
        ax.set_title(f"Spearman ρ = {rho:+.2f}" if np.isfinite(rho) else "Spearman ρ: —", loc="left")
    axes[0, 0].set_ylabel("ΔNLL when dropped")
    if len(layers) <= 8:
        axes[0, -1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


@figure_function
def pruning_curves(pruning: pd.DataFrame) -> Figure:
    """NLL against the share of experts pruned per layer, one line per criterion, beside the unpruned model."""
    fig, axes = new_figure(1, 1, height=3.2)
    ax = axes[0, 0]
    base = pruning[pruning.criterion == "none"]
    reference = float(base.nll.iloc[0]) if len(base) else np.nan
    for criterion in [c for c in CRITERION_COLORS if c in set(pruning.criterion)]:
        rows = pd.concat([base, pruning[pruning.criterion == criterion]]).sort_values("share_pruned")
        ax.errorbar(rows.share_pruned, rows.nll, yerr=2 * rows.delta_nll_se.fillna(0), marker="o", markersize=3.5, capsize=2,
                    linewidth=1.3, color=CRITERION_COLORS[criterion], label=f"by {criterion}")
    ax.axhline(reference, color="#C0392B", linestyle="--", linewidth=1, label="unpruned")
    ax.set_xlabel("share of experts pruned in every swept layer (least important first)")
    ax.set_ylabel("NLL (nats/token)")
    ax.set_title("Pruning curves (bars ±2 SE of the change)", loc="left")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


@figure_function
def specialisation_bars(spec: pd.DataFrame) -> Figure:
    """Per layer and domain: ΔNLL of that domain's tokens against the other tokens when the layer's most
    domain-specific expert is dropped."""
    domains = sorted(spec.domain.unique())
    fig, axes = new_figure(1, len(domains), height=3.0)
    for ax, domain in zip(axes[0], domains):
        part = spec[spec.domain == domain].sort_values("layer")
        x = np.arange(len(part))
        ax.bar(x - 0.2, part.delta_nll_domain, width=0.4, color=PALETTE[0], label=f"{domain} tokens")
        ax.bar(x + 0.2, part.delta_nll_other_domains, width=0.4, color="#999999", label="other tokens")
        ax.set_xticks(x, [f"L{l}\ne{e}" for l, e in zip(part.layer, part.expert)])
        ax.axhline(0, color="#888888", linewidth=0.8)
        ax.set_title(f"dropping the most {domain}-specific expert", loc="left")
        ax.legend(loc="upper right")
    axes[0, 0].set_ylabel("ΔNLL (nats/token)")
    return fig
