"""Figures of the simulations: expert placement (balancedness, GPU loads, staleness) and offloading (hit rate
against cache size with the Belady bound, stall time against link bandwidth)."""

from __future__ import annotations

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
    no_data,
    percent_axis,
    ratio_colorbar,
    ratio_norm,
    split_overall,
)

PLACEMENT_COLORS = {"static": "#888888", "greedy": PALETTE[1], "eplb": PALETTE[0], "coactivation": PALETTE[2]}
POLICY_COLORS = {"lru": PALETTE[0], "lfu": PALETTE[2], "arc": PALETTE[4], "belady": "#000000", "static": PALETTE[1],
                 "static-oracle": "#666666"}


@figure_function
def placement_balancedness(per_layer: pd.DataFrame) -> Figure:
    """Balancedness (mean / max GPU load) per layer for each placement; static sharding is "before"."""
    fig, axes = new_figure(1, 1, height=3.0)
    ax = axes[0, 0]
    for policy, rows in per_layer.groupby("policy", sort=False):
        layers, overall = split_overall(rows)
        pooled = "" if overall is None else f" (all layers {overall['balancedness']:.3f})"
        ax.plot(layers["layer"], layers["balancedness"], marker="o" if len(layers) <= 40 else None, markersize=3,
                color=PLACEMENT_COLORS.get(policy, PALETTE[3]), linestyle="--" if policy == "static" else "-",
                label=("before: " if policy == "static" else "after: ") + policy + pooled)
    layer_axis(ax, sorted(int(l) for l in per_layer["layer"].unique() if l != OVERALL))
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("balancedness (mean / max GPU load)")
    ax.set_title("GPU balance per layer, before and after rebalancing (1 = every GPU equally busy)", loc="left")
    ax.legend(loc="lower right")
    return fig


@figure_function
def gpu_load_heatmaps(gpu_load: pd.DataFrame) -> Figure:
    """Layer x GPU tokens relative to the layer's mean GPU load, one panel per placement."""
    policies = list(dict.fromkeys(gpu_load["policy"]))
    layers = sorted(gpu_load["layer"].unique())
    G = int(gpu_load["gpu"].max()) + 1
    row_of = {layer: i for i, layer in enumerate(layers)}
    height = float(np.clip(1.5 + 0.16 * len(layers), 2.4, 9.0))
    fig, axes = new_figure(1, len(policies), height=height)
    matrices = {}
    for policy in policies:
        rows = gpu_load[gpu_load["policy"] == policy]
        m = full_matrix(rows.assign(row=rows["layer"].map(row_of)), "row", "gpu", "tokens", len(layers), G)
        with np.errstate(divide="ignore", invalid="ignore"):
            matrices[policy] = np.log2(m / m.mean(axis=1, keepdims=True))
    norm = ratio_norm(np.concatenate([m.ravel() for m in matrices.values()]), floor=0.5, cap=2.0)
    image = None
    for ax, policy in zip(axes[0], policies):
        image = heatmap(ax, np.clip(matrices[policy], norm.vmin, norm.vmax), row_labels=layers, col_labels=list(range(G)),
                        cmap="RdBu_r", norm=norm, annotate=False)
        ax.set_xlabel("GPU")
        ax.set_title(policy, loc="left")
    axes[0, 0].set_ylabel("MoE layer")
    ratio_colorbar(fig, image, axes[0, -1], "GPU load / layer mean")
    return fig


@figure_function
def staleness(frame: pd.DataFrame) -> Figure:
    """All-layer balancedness per window: the window's own placement against the previous window's."""
    fig, axes = new_figure(1, 1, height=3.0)
    ax = axes[0, 0]
    pooled = frame[frame["layer"] == OVERALL]
    for policy, rows in pooled.groupby("policy", sort=False):
        color = PLACEMENT_COLORS.get(policy, PALETTE[3])
        ax.plot(rows["window"], rows["balancedness_fresh"], color=color, marker="o", markersize=3, label=f"{policy}: own window")
        if policy != "static":
            ax.plot(rows["window"], rows["balancedness_stale"], color=color, marker="x", markersize=4, linestyle=":",
                    label=f"{policy}: previous window's")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("window (in trace order)")
    ax.set_ylabel("balancedness, all layers")
    ax.set_title("Staleness: a placement computed on window t, served on window t + 1", loc="left")
    ax.legend(loc="lower right", ncols=2)
    return fig


@figure_function
def hit_rate_vs_capacity(hit_rate: pd.DataFrame, phase: str) -> Figure:
    """Hit rate against capacity per policy, one panel per prefetcher; Belady (offline optimal) is the bound."""
    rows = hit_rate[(hit_rate["layer"] == OVERALL) & (hit_rate["phase"] == phase)]
    prefetchers = list(dict.fromkeys(rows["prefetch"]))
    fig, axes = new_figure(1, max(1, len(prefetchers)), height=3.2)
    for ax, prefetch in zip(axes[0], prefetchers):
        mine = rows[rows["prefetch"] == prefetch]
        for policy, curve in mine.groupby("policy", sort=False):
            curve = curve.sort_values("capacity")
            bound = policy in ("belady", "static-oracle")
            ax.plot(curve["capacity"], curve["hit_rate"], color=POLICY_COLORS.get(policy, PALETTE[3]), marker="o", markersize=3,
                    linestyle="--" if bound else "-", label=f"{policy} (hindsight)" if bound else policy)
        ax.set_ylim(0, 1.02)
        percent_axis(ax)
        ax.set_xlabel(f"capacity (experts, {rows['scope'].iloc[0] if len(rows) else ''} cache)")
        ax.set_title(f"prefetch: {prefetch}", loc="left")
    axes[0, 0].set_ylabel(f"hit rate ({phase})")
    axes[0, 0].legend(loc="lower right")
    if not prefetchers:
        no_data(axes[0, 0], f"no {phase} tokens")
    return fig


@figure_function
def stall_vs_bandwidth(sweep: pd.DataFrame, capacity: int, phase: str, latency_us: float) -> Figure:
    """Stall (demand fetches) and link time per token against link bandwidth, per policy and prefetcher."""
    rows = sweep[(sweep["capacity"] == capacity) & (sweep["phase"] == phase)]
    fig, axes = new_figure(1, 1, height=3.2)
    ax = axes[0, 0]
    styles = ["-", ":", "-.", (0, (5, 1)), (0, (1, 3))]
    prefetchers = list(dict.fromkeys(rows["prefetch"]))
    for (policy, prefetch), curve in rows.groupby(["policy", "prefetch"], sort=False):
        curve = curve.sort_values("bandwidth_gbps")
        ax.plot(curve["bandwidth_gbps"], curve["stall_s_per_token"] * 1e3, color=POLICY_COLORS.get(policy, PALETTE[3]),
                linestyle=styles[prefetchers.index(prefetch) % len(styles)], label=f"{policy}, {prefetch}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"link bandwidth (GB/s; {latency_us:g} µs per transfer)")
    ax.set_ylabel(f"stall per {phase} token (ms)")
    ax.set_title(f"Time a token waits for experts fetched on demand, {capacity}-expert cache", loc="left")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="center left", bbox_to_anchor=(1.01, 0.5), ncols=1 + len(handles) // 9)
    else:
        no_data(ax, "no stalls: every lookup hit")
    return fig

