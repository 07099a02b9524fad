"""Figures of the offloading bounds and the placement questions past one static EPLB: the coverage curve, the
oracle gap per capacity, the lossy-routing quality frontier, fan-out against balancedness per placement, the
LP split bound, and distinct experts per decode batch."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from moescope.reporting.figures._base import OVERALL, PALETTE, figure_function, layer_axis, new_figure, no_data, percent_axis
from moescope.reporting.figures.simulate import PLACEMENT_COLORS


@figure_function
def coverage_curve(curve: pd.DataFrame) -> Figure:
    """Share of a layer's lookups its n most used experts serve, per phase: thin lines per layer, thick the mean."""
    phases = list(dict.fromkeys(curve["phase"]))
    fig, axes = new_figure(1, max(1, len(phases)), height=3.2)
    for ax, phase in zip(axes[0], phases):
        rows = curve[curve["phase"] == phase]
        for _, layer in rows.groupby("layer"):
            ax.plot(layer["experts"], layer["share"], color=PALETTE[0], alpha=0.25, linewidth=0.8)
        mean = rows.groupby("experts")["share"].mean()
        ax.plot(mean.index, mean.to_numpy(), color="#000000", linewidth=2, label="mean over layers")
        E = int(rows["experts"].max())
        ax.plot([0, E], [0, 1], color="#999999", linestyle=":", label="uniform routing")
        ax.set_xlim(0, E)
        ax.set_ylim(0, 1.02)
        percent_axis(ax)
        ax.set_xlabel("experts kept (most used first)")
        ax.set_title(f"{phase}: lookups the top experts serve", loc="left")
    axes[0, 0].set_ylabel("share of lookups")
    axes[0, 0].legend(loc="lower right")
    if not phases:
        no_data(axes[0, 0], "no lookups")
    return fig


@figure_function
def oracle_gap(gap: pd.DataFrame) -> Figure:
    """Per capacity (prefetch none): the hindsight bounds, the best policy an engine can run, LRU, the pinned set
    learned on the other fold, and a random fixed set."""
    rows = gap[gap["prefetch"] == "none"] if (gap["prefetch"] == "none").any() else gap
    phases = list(dict.fromkeys(rows["phase"]))
    fig, axes = new_figure(1, max(1, len(phases)), height=3.2)
    lines = (("belady", "belady (hindsight)", "#000000", "--"), ("static_oracle", "static-oracle (hindsight)", "#666666", "--"),
             ("best_realisable", "best realisable", PALETTE[3], "-"), ("lru", "lru", PALETTE[0], "-"),
             ("static", "static (other fold)", PALETTE[1], "-"), ("random_set", "random fixed set", "#999999", ":"))
    for ax, phase in zip(axes[0], phases):
        mine = rows[rows["phase"] == phase].sort_values("capacity")
        for column, label, color, style in lines:
            if mine[column].notna().any():
                ax.plot(mine["capacity"], mine[column], color=color, linestyle=style, marker="o", markersize=3, label=label)
        ax.set_ylim(0, 1.02)
        percent_axis(ax)
        ax.set_xlabel("capacity (experts)")
        ax.set_title(f"{phase}: hit rate, bounds and baselines", loc="left")
    axes[0, 0].set_ylabel("hit rate")
    axes[0, 0].legend(loc="lower right", fontsize=7)
    if not phases:
        no_data(axes[0, 0], "no capacities")
    return fig


@figure_function
def quality_frontier(lossy: pd.DataFrame) -> Figure:
    """Hit rate against ΔNLL (± standard error) per knob when the model ran, else against the router weight
    discarded; one point per capacity."""
    rows = lossy[lossy["layer"] == OVERALL]
    model = rows[rows["source"] == "model"] if "delta_nll" in rows else rows.iloc[:0]
    use = model if len(model) else rows[rows["source"] == "trace"]
    y, label = ("delta_nll", "ΔNLL per token (nats)") if len(model) else ("weight_discarded", "router weight discarded")
    fig, axes = new_figure(1, 1, height=3.4)
    ax = axes[0, 0]
    for i, (knob, curve) in enumerate(use.groupby("knob", sort=False)):
        curve = curve.sort_values("capacity")
        color = "#000000" if knob == "lru" else PALETTE[i % len(PALETTE)]
        err = curve["delta_nll_se"] if y == "delta_nll" else None
        ax.errorbar(curve["hit_rate"], curve[y], yerr=err, color=color, marker="o", markersize=4, capsize=2, label=knob)
        for _, point in curve.iterrows():
            ax.annotate(f"C={int(point['capacity'])}", (point["hit_rate"], point[y]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    percent_axis(ax, "x")
    ax.set_xlabel("hit rate (hits / experts used)")
    ax.set_ylabel(label)
    ax.set_title("What each knob's cache hits cost" + (" in quality" if y == "delta_nll" else ""), loc="left")
    ax.legend(loc="upper left", fontsize=7)
    if not len(use):
        no_data(ax, "no lossy knobs")
    return fig


@figure_function
def fanout_vs_balance(per_layer: pd.DataFrame) -> Figure:
    """Each placement, all layers: balancedness (x) against mean GPUs a token's dispatch reaches (y)."""
    rows = per_layer[per_layer["layer"] == OVERALL]
    fig, axes = new_figure(1, 1, height=3.2)
    ax = axes[0, 0]
    for _, row in rows.iterrows():
        ax.scatter(row["balancedness"], row["mean_gpus_per_token"], s=40, color=PLACEMENT_COLORS.get(row["policy"], PALETTE[3]),
                   label=row["policy"])
        ax.annotate(row["policy"], (row["balancedness"], row["mean_gpus_per_token"]), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")
    ax.set_xlabel("balancedness (mean / max GPU load, all layers)")
    ax.set_ylabel("GPUs a token reaches (mean)")
    ax.set_title("All-to-all fan-out at each placement's balance (lower right is better)", loc="left")
    if not rows["mean_gpus_per_token"].notna().any():
        no_data(ax, "fan-out needs `moescope placement` on a trace")
    return fig


@figure_function
def split_bound(split: pd.DataFrame) -> Figure:
    """Per window: the stale placement's balancedness with the even split and with the LP's best split."""
    rows = split[split["layer"] == OVERALL]
    fig, axes = new_figure(1, 1, height=3.0)
    ax = axes[0, 0]
    for policy, curve in rows.groupby("policy", sort=False):
        color = PLACEMENT_COLORS.get(policy, PALETTE[3])
        curve = curve.sort_values("window")
        ax.plot(curve["window"], curve["balancedness_even"], color=color, linestyle="-", marker="o", markersize=3,
                label=f"{policy}: even split")
        ax.plot(curve["window"], curve["balancedness_lp"], color=color, linestyle="--", marker="^", markersize=3,
                label=f"{policy}: LP split (bound)")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("window (served by the placement of the window before)")
    ax.set_ylabel("balancedness, all layers")
    ax.set_title("Splitting each window's tokens over replicas: even against the LP bound", loc="left")
    ax.legend(loc="lower right", fontsize=7)
    if not len(rows):
        no_data(ax, "staleness needs two windows")
    return fig


@figure_function
def decode_batches(table: pd.DataFrame) -> Figure:
    """Distinct experts per layer in a decode batch, random against grouped by prefill routing."""
    fig, axes = new_figure(1, 1, height=3.0)
    ax = axes[0, 0]
    for i, (batching, rows) in enumerate(table.groupby("batching", sort=False)):
        rows = rows[rows["layer"] != OVERALL].sort_values("layer")
        ax.plot(rows["layer"], rows["mean_distinct_experts"], marker="o", markersize=3, color=PALETTE[i], label=batching)
    layers = sorted(int(l) for l in table["layer"].unique() if l != OVERALL)
    layer_axis(ax, layers)
    ax.set_ylabel("distinct experts per batch")
    ax.set_title(f"Decode batches of {int(table['batch_size'].iloc[0])} requests", loc="left")
    ax.legend(loc="lower right")
    return fig
