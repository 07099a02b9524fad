"""Router saturation across checkpoints: top-1 agreement and top-k overlap with the final checkpoint, per layer."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from moescope.reporting.figures._base import PALETTE, figure_function, new_figure, percent_axis


@figure_function
def saturation_curves(per_layer: pd.DataFrame, x_label: str) -> Figure:
    """One line per MoE layer over the checkpoints (thick: all layers pooled); 100 % = routes as the final one."""
    fig, axes = new_figure(1, 2, height=3.0)
    panels = (("top1_agreement", "top-1 agreement with the final checkpoint"),
              ("topk_overlap", "top-k overlap |∩|/k with the final checkpoint"))
    layers = sorted(int(l) for l in per_layer["layer"].unique() if l >= 0)
    for ax, (column, title) in zip(axes[0], panels):
        for n, layer in enumerate(layers):
            rows = per_layer[per_layer["layer"] == layer].sort_values("order")
            ax.plot(rows["step"], rows[column], marker="o", markersize=3, linewidth=1,
                    color=PALETTE[n % len(PALETTE)], alpha=0.7, label=f"layer {layer}" if len(layers) <= 8 else None)
        pooled = per_layer[per_layer["layer"] == -1].sort_values("order")
        ax.plot(pooled["step"], pooled[column], color="#222222", linewidth=2.2, label="all layers")
        ax.set_ylim(0, 1.02)
        percent_axis(ax, "y")
        ax.set_title(title, loc="left")
        ax.set_xlabel(x_label)
        ax.legend(loc="lower right", fontsize=7)
    return fig
