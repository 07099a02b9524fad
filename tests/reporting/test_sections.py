"""What the report derives from result tables (sizes per token and layer, headline texts) and how it reads
results folders, including damaged ones."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from moescope.reporting.results import AnalysisResults, MissingResults, QuantResults, load_results
from moescope.reporting.sections.common import fmt
from moescope.reporting.sections.headline import headline, quant_verdicts
from moescope.reporting.sections.tokens import sizes_from_combinations, token_layer_sizes, visible_token


def test_token_layer_sizes_match_a_direct_computation():
    rng = np.random.default_rng(0)
    rows = [(t, l, e, int(rng.integers(1, 9))) for t in (3, 8, 40) for l in (0, 1) for e in rng.choice(4, 2, replace=False)]
    frame = pd.DataFrame(rows, columns=["token_id", "layer", "expert", "count"])
    sizes = {0: [100, 100, 10, 10], 1: [50, 5, 5, 500]}
    got = token_layer_sizes(frame, sizes, top_k=2).set_index(["token_id", "layer"])
    for (t, l), group in frame.groupby(["token_id", "layer"]):  # reference: a plain loop over the few rows
        total = sum(c for c in group["count"])
        mean = sum(c * sizes[l][e] for e, c in zip(group["expert"], group["count"])) / total
        assert got.loc[(t, l), "avg_size"] == pytest.approx(mean)
        assert got.loc[(t, l), "occurrences"] == pytest.approx(total / 2)
    assert token_layer_sizes(frame, None, 2) is None and token_layer_sizes(frame.iloc[:0], sizes, 2) is None


def test_sizes_are_recovered_from_the_routing_table_when_the_manifest_is_gone():
    tokens = pd.DataFrame({"layer_0": ["(1(2432),3(128))", "(0(2432),1(2432))"], "layer_1": ["(2(128),3(128))", "()"]})
    assert sizes_from_combinations(tokens) == {0: [128, 2432], 1: [128]}
    assert sizes_from_combinations(pd.DataFrame({"layer_0": ["(1,3)"]})) is None


def test_visible_token_shows_whitespace_and_control_characters():
    assert visible_token("a\nb\tc\\") == "a\\nb\\tc\\\\"
    assert visible_token("\x00x") == "\\x00x"
    assert visible_token(" lead") == " lead" and visible_token(None) == "" and visible_token(float("nan")) == ""


@pytest.mark.parametrize("value, spec, text", [(None, ".3f", "—"), (float("nan"), ".3f", "—"), (float("inf"), "d", "—"),
                                               (0.12345, ".1%", "12.3%"), (1234.4, ",d", "1,234"), ("n/a", ".3f", "n/a")])
def test_fmt(value, spec, text):
    assert fmt(value, spec) == text


def test_load_results_tells_the_kinds_apart(report_inputs, tmp_path):
    full = load_results(report_inputs["full"])
    assert isinstance(full, AnalysisResults) and full.manifest is not None and full.expert_sizes() == {l: [2432] * 4 + [128] * 4 for l in range(4)}
    assert isinstance(load_results(report_inputs["quant"]), QuantResults)
    missing = load_results(report_inputs["missing"])
    assert isinstance(missing, MissingResults) and "not found" in missing.reason
    assert isinstance(load_results(tmp_path), MissingResults)  # an empty folder

    copy = tmp_path / "copy"
    shutil.copytree(report_inputs["full"], copy)
    for parquet in copy.glob("load__*.parquet"):
        parquet.unlink()  # CSV only: still read
    summary = json.loads((copy / "summary.json").read_text())
    summary["trace"]["path"] = str(tmp_path / "gone")
    (copy / "summary.json").write_text(json.dumps(summary))
    moved = load_results(copy)
    expected = pd.read_parquet(report_inputs["full"] / "load__per_expert.parquet")
    pd.testing.assert_frame_equal(moved.table("load", "per_expert"), expected, check_dtype=False)
    assert moved.manifest is None and "manifest not found" in moved.manifest_note
    assert moved.table("load", "no_such_table") is None

    quant_csv = tmp_path / "quant-csv"
    quant_csv.mkdir()
    shutil.copy(report_inputs["quant"] / "configs.csv", quant_csv)
    q = load_results(quant_csv)  # a sweep that wrote its tables but not (yet) its summary
    assert isinstance(q, QuantResults) and len(q.configs) and q.per_layer is None and q.summary == {}


def test_headline_and_verdicts(report_inputs):
    full, quant = load_results(report_inputs["full"]), load_results(report_inputs["quant"])
    h = headline([("a", full), ("q", quant), ("m", load_results(report_inputs["missing"]))])
    assert h.columns == ("a",)
    values = dict(h.rows)
    balance = values["balance score, worst layer / layer mean (1 = even)"][0]
    assert balance.startswith(f"{full.get('load', 'balance_score_worst'):.3f} (layer {full.get('load', 'balance_score_worst_layer')}) / "
                              f"{full.get('load', 'balance_score_layer_mean'):.3f}")
    assert balance.endswith(f"pooled {full.get('load', 'balance_score_pooled'):.3f}")
    loss = values["load-balancing loss, worst layer / layer mean (balanced = k)"][0]
    assert loss.startswith(f"{full.get('aux_losses', 'load_balancing_loss_worst'):.4g} (layer ")
    assert loss.endswith(f"pooled as transformers computes it: {full.get('aux_losses', 'load_balancing_loss_pooled_transformers'):.4g}")
    assert values["dead experts"][0].startswith(f"{full.get('load', 'n_dead')} of 32")
    answers = {a["bits"]: a["router_costs_more_per_param"] for a in quant.summary["router_vs_experts"]}
    (verdict,) = quant_verdicts(quant, "")
    parts = dict(part.split(" at ", 1) for part in verdict.split("? ", 1)[1].split("; "))
    for bits, answer in answers.items():
        assert f"{bits}-bit rtn-asym (channel)" in parts[answer].split(", ")
    assert list(parts) == list(dict.fromkeys(answers[b] for b in sorted(answers)))  # in order of bits
    assert h.verdicts == (verdict,)


def test_prose_shows_backticked_commands_as_code_and_escapes_everything():
    from moescope.reporting.html import esc, prose

    assert prose("run `moescope capture --x <y>` & go") == "run <code>moescope capture --x &lt;y&gt;</code> &amp; go"
    assert prose("`<script>`") == "<code>&lt;script&gt;</code>" and esc('"') == "&quot;"


def test_corpus_line_keeps_what_a_reader_needs():
    from moescope.reporting.sections.common import corpus_text

    corpus = {"spec": "humaneval,wiki", "split": "eval", "split_rule": "x" * 200, "docs": 433, "chars": 291428,
              "sources": [{"entry": "humaneval", "domain": "code", "docs": 21, "description": "long text"},
                          {"entry": "wiki", "domain": "prose", "docs": 412}]}
    assert corpus_text(corpus) == ("humaneval,wiki; eval split; 433 documents; 291,428 characters; "
                                   "sources: humaneval (code, 21 docs), wiki (prose, 412 docs)")
    assert corpus_text({"spec": "input_ids", "rows": 32}) == "input_ids; rows=32"
    assert corpus_text(None) == "unknown" and corpus_text("wiki") == "wiki"


def test_mostly_large_means_token_costs_share_in_every_figure(report_inputs):
    """'mostly large' is one notion: a (token, layer) pair whose mean selected expert size is above the layer's
    threshold, token_cost's `mostly_large_share`; the per-layer figure's titles print exactly those shares."""
    from moescope.reporting.results import load_results
    from moescope.reporting.sections.common import shape_of
    from moescope.reporting.sections.tokens import size_section

    results = load_results(report_inputs["full"])
    per_layer = results.table("token_cost", "per_layer")
    section = size_section(results, "s", shape_of(results))
    (block,) = [b for b in section.blocks if getattr(b, "name", None) == "expert_size_by_layer"]
    titles = [ax.get_title(loc="left") for ax in block.make().axes if ax.get_title(loc="left")]
    assert titles
    shares = dict(zip(per_layer["layer"], per_layer["mostly_large_share"]))
    for title in titles:
        layer, share = title.removeprefix("layer ").split(": ")
        assert share == f"{shares[int(layer)]:.0%} mostly large"
