"""Figure functions: readable axes at 256 experts x 64 layers, pure (inputs untouched, style not leaked),
byte-stable rendering."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest

from moescope.reporting.figures import facet_layers, load, render_png, render_svg, router
from moescope.reporting.figures._base import index_ticks, new_figure, tick_step


def _per_expert(n_layers: int, n_experts: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    counts = rng.zipf(1.6, size=(n_layers, n_experts)).astype(float)
    counts[0, 5] = 0  # one dead expert
    share = counts / counts.sum(axis=1, keepdims=True)
    ratio = share * n_experts
    status = np.where(counts == 0, "dead", np.where(ratio > 1.5, "overloaded", np.where(ratio < 0.5, "underused", "ok")))
    return pd.DataFrame({
        "layer": np.repeat(np.arange(n_layers), n_experts), "expert": np.tile(np.arange(n_experts), n_layers),
        "count": counts.ravel(), "share": share.ravel(), "expected_share": 1.0 / n_experts,
        "load_over_expected": ratio.ravel(), "status": status.ravel(),
    })


@pytest.mark.parametrize("n, expected", [(1, 1), (8, 1), (16, 1), (17, 2), (60, 4), (128, 8), (256, 16), (1000, 64)])
def test_tick_step_is_round_and_bounded(n, expected):
    assert tick_step(n, 16) == expected
    assert len(range(0, n, tick_step(n, 16))) <= 16


def test_facet_layers_keeps_first_and_last():
    assert facet_layers([0, 1, 2]) == [0, 1, 2]
    assert facet_layers(list(range(60)), 4) == [0, 20, 39, 59]
    assert facet_layers([-1, 3, 4], 4) == [3, 4]  # the pooled row is no layer
    assert facet_layers([], 4) == []


def test_heatmap_axes_stay_readable_at_64_layers_and_256_experts():
    per_expert = _per_expert(64, 256)
    fig = load.load_heatmap(per_expert)
    ax = fig.axes[0]
    xlabels = [t.get_text() for t in ax.get_xticklabels()]
    ylabels = [t.get_text() for t in ax.get_yticklabels()]
    assert 8 <= len(xlabels) <= 16 and 8 <= len(ylabels) <= 16
    assert xlabels[:3] == ["0", "16", "32"] and ylabels[:3] == ["0", "4", "8"]
    image = ax.get_images()[0].get_array()
    assert image.shape == (64, 256) and image.mask[0, 5]  # the dead expert is drawn in the 'bad' colour
    assert fig.get_size_inches()[1] <= 9.0


def test_bars_beyond_64_experts_are_ranked_with_the_extremes_named():
    per_expert = _per_expert(3, 256)
    fig = load.load_bars(per_expert, [0, 2])
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert len(heights) == 256 and heights == sorted(heights, reverse=True)
    layer0 = per_expert[per_expert.layer == 0].sort_values("share", ascending=False, kind="stable")
    named = [t.get_text() for t in ax.texts]
    assert named[:3] == [f"e{e}" for e in layer0.expert[:3]]
    assert named[-3:] == [f"e{e}" for e in layer0.expert[-3:]]
    assert ax.get_xticks().size == 0  # no unreadable per-expert labels


def test_bars_up_to_64_experts_keep_expert_order_and_status_colours():
    per_expert = _per_expert(1, 8)
    fig = load.load_bars(per_expert, [0])
    bars = fig.axes[0].patches
    assert [p.get_height() for p in bars] == pytest.approx(per_expert.share.tolist())
    dead = matplotlib.colors.to_hex(bars[5].get_facecolor())
    assert dead == "#222222"


def test_figure_functions_leave_inputs_and_global_style_alone():
    per_expert = _per_expert(6, 16)
    before = per_expert.copy()
    salt = matplotlib.rcParams["svg.hashsalt"]
    figs = [load.load_heatmap(per_expert), load.load_histogram(per_expert), load.load_bars(per_expert, facet_layers(range(6)))]
    pd.testing.assert_frame_equal(per_expert, before)
    assert matplotlib.rcParams["svg.hashsalt"] == salt and matplotlib.rcParams["text.parse_math"] is True
    assert all(f.get_layout_engine() is not None for f in figs)


def test_rendering_is_byte_stable():
    pairs = pd.DataFrame({"layer": 0, "expert_a": [0, 0, 1], "expert_b": [1, 2, 2], "cosine": [0.5, -0.2, 0.1]})
    a, b = router.cosine_matrices(pairs, [0], 3), router.cosine_matrices(pairs, [0], 3)
    svg = render_svg(a)
    assert svg == render_svg(b) and b"<svg" in svg and b"Date" not in svg and b"Matplotlib v" not in svg
    assert render_png(a) == render_png(b)


def test_log_axes_have_plain_labels():
    """text.parse_math is off (names may hold $), so log axes get plain labels instead of mathtext ones."""
    hist = pd.DataFrame({"quantity": "weight_ratio", "layer": -1, "bin_lo": [-np.inf, 1, 10, 100], "bin_hi": [1, 10, 100, np.inf],
                         "count": [0, 5, 3, 1]})
    fig = router.gate_weight_distributions(hist)
    render_svg(fig)  # ticks are only final after a draw
    labels = [t.get_text() for t in fig.axes[1].get_xticklabels() if t.get_text()]
    assert labels and all("$" not in t and "mathdefault" not in t for t in labels)
    assert {"1", "10", "100"} <= set(labels)


def test_index_ticks_label_positions_with_given_labels():
    fig, axes = new_figure()
    index_ticks(axes[0, 0], "y", [10, 11, 12, 13], max_ticks=2)
    assert [t.get_text() for t in axes[0, 0].get_yticklabels()] == ["10", "12"]


def test_prefetch_figures_draw_the_popularity_baseline():
    from moescope.analysis import run_analyses
    from moescope.analysis.synthetic import SyntheticSpec, synthetic_trace
    from moescope.reporting.figures import routing

    spec = SyntheticSpec(n_layers=4, n_experts=8, top_k=2, seq_len=(8, 40))
    results = run_analyses(list(synthetic_trace(spec, 1500, 500, seed=2)), spec.context(), only=["cross_layer", "expert_cache"])
    tables = results["cross_layer"].to_pandas()
    overall, cache = tables["recall_overall"], results["expert_cache"].to_pandas()
    label = routing.PREDICTOR_LABELS["popularity"]

    def line(fig, name):
        (found,) = [l for l in fig.axes[0].get_lines() if l.get_label() == name]
        return found

    hops = overall[(overall.predictor == "popularity") & (overall.hop >= 1)].sort_values("hop")
    np.testing.assert_allclose(line(routing.recall_vs_hop(overall, 2, 8), label).get_ydata(), hops.recall)
    per_layer = tables["recall"].query("predictor == 'popularity' and hop == 1").sort_values("target_layer")
    np.testing.assert_allclose(line(routing.recall_per_layer(tables["recall"], 2), label).get_ydata(), per_layer.recall)
    rates = cache.query("predictor == 'popularity' and layer == -1").sort_values("capacity")
    np.testing.assert_allclose(line(routing.cache_hit_rate(cache, 8, 2), label).get_ydata(), rates.hit_rate)
