"""The live counters without vLLM: the counting that vLLM traces into its compiled graph, compiled here the same
way (torch.compile, Inductor, dynamic shapes, one trace replayed), against a NumPy reference; and what the
publisher puts on /metrics under each MOESCOPE_VLLM_EXPERT_SERIES setting, read back by prometheus_client's
MultiProcessCollector and `moescope top`."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from moescope.serve import metrics
from moescope.serve.load_counter import LoadCounter, MonitorOptions, Publisher
from moescope.serve.top import parse_snapshot, render

E, K = 8, 2


def reference(steps) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """counts [L, E], tokens [L], entropy_sum [L] of steps [(rows, [(layer, logits [n, E], ids [n, k]), ...])]."""
    counts, tokens, entropy_sum = np.zeros((2, E), np.int64), np.zeros(2, np.int64), np.zeros(2)
    for rows, calls in steps:
        seen = [0, 0]
        for layer, logits, ids in calls:
            take = max(0, min(len(ids), rows - seen[layer]))
            seen[layer] += len(ids)
            for row in range(take):  # per-row loop on purpose: a plain reference
                for e in ids[row]:
                    counts[layer, e] += 1
                p = np.exp(logits[row] - logits[row].max())
                p /= p.sum()
                entropy_sum[layer] += -(p * np.log(p)).sum()
            tokens[layer] += take
    return counts, tokens, entropy_sum


def make_steps(seed: int):
    rng = np.random.default_rng(seed)
    steps = []
    for rows, padded in [(1, 1), (7, 16), (256, 256), (3, 9), (0, 4)]:  # padded rows after the real ones
        calls = []
        for layer in (0, 1):
            logits = rng.normal(size=(padded, E)).astype(np.float32)
            ids = np.argsort(-logits, axis=1)[:, :K].astype(np.int32)
            cut = padded // 2 if layer == 1 else padded  # layer 1 routes its step in two pieces
            calls += [(layer, logits[:cut], ids[:cut]), (layer, logits[cut:], ids[cut:])] if cut < padded and cut else \
                [(layer, logits, ids)]
        steps.append((rows, calls))
    return steps


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
def test_counting_traced_once_equals_a_plain_reference_and_never_counts_padding(compiled):
    counter = LoadCounter([E, E], [K, K])

    def forward(logits0, ids0, logits1, ids1):  # one model step: what vLLM traces once and replays
        counter.count(0, logits0, None, ids0)
        counter.count(1, logits1, None, ids1)
        return logits0.sum()

    def split_forward(logits0, ids0, la, ia, lb, ib):  # layer 1 in two pieces
        counter.count(0, logits0, None, ids0)
        counter.count(1, la, None, ia)
        counter.count(1, lb, None, ib)
        return logits0.sum()

    if compiled:
        torch._dynamo.reset()
        forward = torch.compile(forward, backend="inductor", fullgraph=True, dynamic=True)
        split_forward = torch.compile(split_forward, backend="inductor", fullgraph=True, dynamic=True)
    steps = make_steps(3)
    for rows, calls in steps:
        counter.start_step(rows)
        tensors = [torch.from_numpy(x) for _, logits, ids in calls for x in (logits, ids)]
        (forward if len(calls) == 2 else split_forward)(*tensors)
    counts, tokens, entropy_sum = reference(steps)
    snap = counter.snapshot()
    np.testing.assert_array_equal(snap.counts, counts)
    np.testing.assert_array_equal(snap.tokens, tokens)
    assert (snap.counts.sum(axis=1) == tokens * K).all()
    np.testing.assert_allclose(snap.entropy_sum, entropy_sum, rtol=1e-5)


class Fixed:
    """A counter whose totals are set by the test (the publisher reads n_experts, top_k and snapshot())."""

    def __init__(self, counts: np.ndarray, k: int = 2):
        self.n_experts, self.top_k = [counts.shape[1]] * len(counts), [k] * len(counts)
        self.counts = counts

    def snapshot(self):
        from moescope.serve.load_counter import Snapshot

        L = len(self.counts)
        return Snapshot(time.monotonic(), self.counts.copy(), np.full(L, 1.5) * self.counts.sum(1) / 2,
                        self.counts.sum(1) // 2)


def published(tmp_path, counts: np.ndarray, series: metrics.ExpertSeries) -> str:
    """The /metrics text a publisher over `counts` (all counted after its start) produces."""
    counter = Fixed(np.zeros_like(counts))
    publisher = Publisher(counter, MonitorOptions(folder=str(tmp_path), window=60.0, interval=60.0,
                                                  expert_series=series))
    counter.counts = counts
    publisher.publish()
    publisher.files.close()
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    return generate_latest(registry).decode()


def series_of(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0) + 1
    return out


@pytest.mark.parametrize("L, E_, setting", [(7, 256, "none"), (7, 256, "3"), (3, 8, "all"), (58, 256, "none"),
                                            (3, 8, "20")])
def test_series_per_server_follow_the_documented_formula(tmp_path, L, E_, setting):
    series = metrics.ExpertSeries.parse(setting)
    rng = np.random.default_rng(L)
    counts = rng.integers(0, 50, (L, E_)) * 2
    names = series_of(published(tmp_path, counts, series))
    assert sum(names.values()) == series.count(L, E_)
    per_expert = {"none": 0, "all": L * E_}.get(setting, 2 * L * min(int(setting) if setting.isdigit() else 0, E_))
    assert sum(names.values()) == 8 * L + 1 + per_expert
    assert ("moescope_expert_tokens_total" in names) == (setting == "all")


@pytest.mark.parametrize("text, message", [("some", "'some'"), ("0", "'0'"), ("-3", "'-3'")])
def test_a_bad_expert_series_setting_is_refused_naming_it(text, message):
    with pytest.raises(ValueError, match=f"MOESCOPE_VLLM_EXPERT_SERIES={message} must be"):
        metrics.ExpertSeries.parse(text)


def test_hottest_ranks_against_a_plain_reference():
    load = np.array([[5, 9, 9, 0], [0, 0, 0, 0], [1, 2, 3, 4]])
    ids, shares = metrics.hottest(load, 3)
    assert ids.tolist() == [[1, 2, 0], [-1, -1, -1], [3, 2, 1]]  # ties to the lower id; an idle layer: -1
    np.testing.assert_allclose(shares[0], [9 / 23, 9 / 23, 5 / 23])
    assert np.isnan(shares[1]).all()


@pytest.mark.parametrize("setting", ["none", "2", "all"])
def test_top_renders_from_any_series_setting(tmp_path, setting):
    counts = np.array([[10, 30, 0, 20], [0, 8, 8, 4]])
    page = published(tmp_path, counts, metrics.ExpertSeries.parse(setting))
    frame = render("http://h/metrics", parse_snapshot(page, "u", 1.0))
    lines = frame.splitlines()
    assert "2 MoE layers x 4 experts, top-2" in lines[1]
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["layer"])
    rows = [line.split() for line in lines[header + 1: header + 3]]
    # balancedness, max share, active, load entropy
    assert rows[0][1:4] == [f"{60 / 4 / 30:.3f}", "50%", "75%"] and rows[1][1:4] == [f"{20 / 4 / 8:.3f}", "40%", "75%"]
    if setting == "none":
        assert lines[-1] == "hottest experts: not on /metrics (start the server with MOESCOPE_VLLM_EXPERT_SERIES=N or all)"
        assert all(len(r) == 6 for r in rows)
    else:
        assert rows[0][6:10] == ["e1", "50%", "e3", "33%"] and rows[1][6:10] == ["e1", "40%", "e2", "40%"]
        assert len(rows[0]) == (12 if setting == "all" else 10)  # all: the 3 hottest; 2: the two the server ranks


def test_a_bad_expert_series_setting_stops_the_server_in_one_line(monkeypatch):
    from moescope.serve import vllm_plugin

    monkeypatch.setenv("MOESCOPE_VLLM_EXPERT_SERIES", "hot")
    with pytest.raises(RuntimeError) as err:
        vllm_plugin.options()
    assert str(err.value) == "moescope: MOESCOPE_VLLM_EXPERT_SERIES='hot' must be 'none', 'all' or a positive number of experts"
