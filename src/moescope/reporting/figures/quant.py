"""Quantization figures: quality change against bits and weight error (MoE with its dense control), routing
flips and top-k agreement per layer (local and end-to-end), and the sensitivity of single layers.

Inputs: the sweep's `configs` table (config_id, model, target, scheme, bits, granularity, layer [-1 = whole
model], n_params, rel_error, delta_nll, delta_nll_se, flip_top1_local/e2e, jaccard_local/e2e, ...) and
`per_layer` table (config_id, model, target, scheme, bits, granularity, layer, mode [local | e2e],
moe_layer, flip_top1, flip_topk_set, jaccard, kl, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

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
)

TARGET_ORDER = ("router", "experts", "shared", "attention", "all")
TARGET_COLORS = {"router": PALETTE[3], "experts": PALETTE[0], "shared": PALETTE[4], "attention": PALETTE[2], "all": "#333333"}
MODEL_STYLE = {"moe": ("-", "o"), "dense": ("--", "s")}


def targets_in(frame: pd.DataFrame) -> list[str]:
    present = set(frame["target"].astype(str))
    return [t for t in TARGET_ORDER if t in present] + sorted(present - set(TARGET_ORDER))


def schemes_in(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """(scheme, granularity) combinations, sorted."""
    pairs = frame[["scheme", "granularity"]].astype(str).drop_duplicates()
    return sorted(map(tuple, pairs.to_numpy().tolist()))


def _symlog(ax, values: np.ndarray) -> None:
    """Symmetric log y axis (when changes span > 2 decades) whose linear part spans the smallest changes."""
    values = values[np.isfinite(values)]
    finite = np.abs(values[values != 0])
    if finite.size and finite.max() / max(finite.min(), 1e-300) > 100:
        linthresh = float(np.percentile(finite, 10))
        ax.set_yscale("symlog", linthresh=linthresh)
        if values.min() >= 0:  # nothing improved: no empty negative half
            ax.set_ylim(bottom=0)


def _model_legend(ax, targets: Sequence[str], models: Sequence[str]) -> None:
    handles = [line_handle(TARGET_COLORS.get(t, "#999999"), t, "-") for t in targets]
    handles += [line_handle("#555555", "MoE" if m == "moe" else "dense control", MODEL_STYLE.get(m, ("-", "o"))[0],
                            MODEL_STYLE.get(m, ("-", "o"))[1]) for m in models]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5))


@figure_function
def quality_vs_bits(configs: pd.DataFrame, scheme: str, granularity: str) -> Figure:
    """ΔNLL (± 2 SE) of quantizing each target of the whole model, against bits; MoE solid, dense dashed."""
    whole = configs[(configs["layer"] < 0) & (configs["scheme"].astype(str) == scheme) & (configs["granularity"].astype(str) == granularity)]
    fig, axes = new_figure(1, 2, height=3.2)
    targets = targets_in(whole)
    models = [m for m in ("moe", "dense") if m in set(whole["model"])]
    bits = sorted(whole["bits"].astype(int).unique())
    for ax, (column, se_column, label) in zip(
        axes[0], (("delta_nll", "delta_nll_se", "ΔNLL (nats/token)"), ("delta_nll_per_mparam", None, "ΔNLL per million quantized parameters"))
    ):
        for target in targets:
            for model in models:
                rows = whole[(whole["target"] == target) & (whole["model"] == model)].sort_values("bits")
                if not len(rows):
                    continue
                linestyle, marker = MODEL_STYLE.get(model, ("-", "o"))
                y = rows[column].to_numpy(float)
                err = 2 * rows[se_column].to_numpy(float) if se_column else None
                ax.errorbar(rows["bits"].astype(int), y, yerr=err, color=TARGET_COLORS.get(target, "#999999"), linestyle=linestyle,
                            marker=marker, markersize=4, capsize=2, linewidth=1.3)
        ax.axhline(0, color="#888888", linewidth=0.8)
        ax.set_xticks(bits)
        ax.set_xlabel("bits per weight")
        ax.set_ylabel(label)
        _symlog(ax, whole[column].to_numpy(float))
    axes[0, 0].set_title("ΔNLL vs bits (bars ±2 SE)", loc="left")
    axes[0, 1].set_title("Per quantized parameter", loc="left")
    _model_legend(axes[0, 1], targets, models)
    return fig


@figure_function
def quality_vs_error(configs: pd.DataFrame) -> Figure:
    """ΔNLL against the relative weight error the quantization caused, every whole-model configuration."""
    whole = configs[configs["layer"] < 0]
    fig, axes = new_figure(1, 1, height=3.2)
    ax = axes[0, 0]
    targets = targets_in(whole)
    models = [m for m in ("moe", "dense") if m in set(whole["model"])]
    for target in targets:
        for model in models:
            rows = whole[(whole["target"] == target) & (whole["model"] == model)]
            _, marker = MODEL_STYLE.get(model, ("-", "o"))
            ax.scatter(rows["rel_error"].to_numpy(float), rows["delta_nll"].to_numpy(float), marker=marker, s=22,
                       color=TARGET_COLORS.get(target, "#999999"), alpha=0.85, facecolors="none" if model == "dense" else None)
    ax.set_xscale("log")
    ax.axhline(0, color="#888888", linewidth=0.8)
    _symlog(ax, whole["delta_nll"].to_numpy(float))
    ax.set_xlabel("relative weight error ‖W − Ŵ‖ / ‖W‖ (log)")
    ax.set_ylabel("ΔNLL (nats/token)")
    ax.set_title("Quality change vs weight error (MoE filled, dense control hollow)", loc="left")
    _model_legend(ax, targets, models)
    return fig


@figure_function
def routing_change_per_layer(per_layer: pd.DataFrame, targets: Sequence[str], scheme: str, granularity: str) -> Figure:
    """Top-1 flip rate and top-k Jaccard agreement per MoE layer, when the whole model's `target` weights are
    quantized; colour = bits, solid = local (only that router's own change), dashed = end-to-end."""
    rows = per_layer[(per_layer["layer"] < 0) & (per_layer["model"] == "moe") & (per_layer["scheme"].astype(str) == scheme)
                     & (per_layer["granularity"].astype(str) == granularity)]
    bits = sorted(rows["bits"].astype(int).unique())
    colors = {b: PALETTE[i % len(PALETTE)] for i, b in enumerate(bits)}
    fig, axes = new_figure(2, len(targets), height=5.0, sharex=True, sharey="row")
    for col, target in enumerate(targets):
        sub = rows[rows["target"] == target]
        for row, (column, label) in enumerate((("flip_top1", "top-1 flip rate"), ("jaccard", "top-k agreement (Jaccard)"))):
            ax = axes[row, col]
            if not len(sub):
                no_data(ax, "not measured")
                continue
            for b in bits:
                for mode, linestyle in (("local", "-"), ("e2e", "--")):
                    line = sub[(sub["bits"] == b) & (sub["mode"] == mode)].sort_values("moe_layer")
                    if len(line):
                        ax.plot(line["moe_layer"], line[column], color=colors[b], linestyle=linestyle, marker="o" if len(line) <= 24 else None,
                                markersize=3)
            percent_axis(ax)
            if col == 0:
                ax.set_ylabel(label)
            if row == 0:
                ax.set_title(f"{target} quantized", loc="left")
            layer_axis(ax, sorted(sub["moe_layer"].unique()))
        axes[0, col].set_ylim(bottom=0)
        axes[1, col].set_ylim(top=1.0)
    handles = [line_handle(colors[b], f"{b}-bit", "-") for b in bits]
    handles += [line_handle("#555555", "local (router input unquantized)", "-"), line_handle("#555555", "end-to-end", "--")]
    fig.legend(handles=handles, loc="outside upper right", ncols=len(handles))
    return fig


@figure_function
def local_vs_end_to_end(per_layer: pd.DataFrame) -> Figure:
    """Per (configuration, layer): local against end-to-end top-1 flip rate when the routers are quantized.
    Above the diagonal, upstream changes add flips to the router's own."""
    rows = per_layer[(per_layer["model"] == "moe") & per_layer["target"].isin(["router", "all"])]
    wide = rows.pivot_table(index=["config_id", "target", "bits", "moe_layer"], columns="mode", values="flip_top1", aggfunc="first").reset_index()
    fig, axes = new_figure(1, 1, width=6.5, height=4.0)
    ax = axes[0, 0]
    if not {"local", "e2e"} <= set(wide.columns):
        no_data(ax, "local and end-to-end flips were not both measured")
        return fig
    bits = sorted(wide["bits"].astype(int).unique())
    colors = {b: PALETTE[i % len(PALETTE)] for i, b in enumerate(bits)}
    for target, marker in (("router", "o"), ("all", "^")):
        for b in bits:
            sub = wide[(wide["target"] == target) & (wide["bits"] == b)]
            if len(sub):
                ax.scatter(sub["local"], sub["e2e"], color=colors[b], marker=marker, s=18, alpha=0.8, linewidths=0)
    hi = float(np.nanmax(wide[["local", "e2e"]].to_numpy(float))) if len(wide) else 1.0
    hi = max(hi * 1.05, 1e-3)
    ax.plot([0, hi], [0, hi], color="#888888", linestyle=":", linewidth=1)
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    percent_axis(ax, "x")
    percent_axis(ax)
    ax.set_xlabel("local top-1 flip rate (only this layer's router quantization)")
    ax.set_ylabel("end-to-end top-1 flip rate")
    ax.set_title("Local vs end-to-end routing flips", loc="left")
    handles = [line_handle(colors[b], f"{b}-bit", "", "o") for b in bits]
    handles += [line_handle("#555555", "router only", "", "o"), line_handle("#555555", "all weights", "", "^")]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


@figure_function
def single_layer_sensitivity(configs: pd.DataFrame, scheme: str, granularity: str) -> Figure:
    """ΔNLL when only one decoder layer's share of a target is quantized, per layer; one panel per bit width."""
    rows = configs[(configs["layer"] >= 0) & (configs["scheme"].astype(str) == scheme) & (configs["granularity"].astype(str) == granularity)]
    bits = sorted(rows["bits"].astype(int).unique())[:4]
    fig, axes = new_figure(1, max(len(bits), 1), height=3.0, sharey=True)
    targets = targets_in(rows) if len(rows) else []
    models = [m for m in ("moe", "dense") if m in set(rows["model"])]
    for ax, b in zip(axes[0], bits):
        for target in targets:
            for model in models:
                line = rows[(rows["bits"] == b) & (rows["target"] == target) & (rows["model"] == model)].sort_values("layer")
                if len(line):
                    linestyle, marker = MODEL_STYLE.get(model, ("-", "o"))
                    ax.plot(line["layer"], line["delta_nll"], color=TARGET_COLORS.get(target, "#999999"), linestyle=linestyle,
                            marker=marker if len(line) <= 24 else None, markersize=3)
        ax.axhline(0, color="#888888", linewidth=0.8)
        ax.set_title(f"{b}-bit", loc="left")
        layer_axis(ax, sorted(rows["layer"].unique()))
        ax.set_xlabel("")
    fig.supxlabel("decoder layer quantized alone", fontsize=9)
    axes[0, 0].set_ylabel("ΔNLL (nats/token)")
    _symlog(axes[0, 0], rows["delta_nll"].to_numpy(float))
    _model_legend(axes[0, -1], targets, models)
    return fig
