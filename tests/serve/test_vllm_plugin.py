"""moescope's vLLM plugin inside a real `vllm serve` of moescope:tiny-moe on loopback (.venv-vllm), in vLLM's
default compiled mode (no --enforce-eager: DYNAMO_TRACE_ONCE + Inductor on this CPU build, where Python around
the router runs once, at tracing time), with the default per-layer series, the 2 hottest experts per layer, and
the load table (the per-expert detail). The same counts in eager mode, with every expert's counter on /metrics:
test_vllm_plugin_eager.py.

One server for the module (one to two minutes to start: it compiles the model): requests go through the openai
client in vLLM's environment (tests/serve/send_requests.py), /metrics is parsed with prometheus_client's own
parser, and the counts are checked against the tokens sent and an offline Hugging Face capture of the same tokens.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from moescope.serve.metrics import ExpertSeries
from plugin_checks import (LOAD_SECONDS, MAX_TOKENS, PROMPTS, check_frame, fed_tokens, offline_capture,
                           offline_entropy_sum, offline_load, per_layer, run_top, scrape, settled, stop_load, table_counts,
                           top_once_under_load, wait_until_tokens_flow)
from serve_helpers import post_completion, send, send_in_background, start_server, vllm_python

pytestmark = pytest.mark.vllm

WINDOW = 6.0  # seconds of the server's sliding window (and of each load-table window)
L, E, K, HOTTEST = 4, 8, 2, 2


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    env = {"MOESCOPE_VLLM_INTERVAL_S": "0.2", "MOESCOPE_VLLM_WINDOW_S": str(WINDOW),
           "MOESCOPE_VLLM_LOAD_TABLE": str(tmp / "load"), "MOESCOPE_VLLM_EXPERT_SERIES": str(HOTTEST)}
    server = start_server(tmp / "server.log", plugin=True, env=env, eager=False)
    yield server, tmp
    server.stop()


def table_settled(folder, before: np.ndarray, expected: int, timeout: float = 60.0) -> np.ndarray:
    """The load table's growth since `before` once every layer has `expected` more slots (files every 0.2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        grown = table_counts(folder) - before
        if (grown.sum(axis=1) == expected).all() or time.monotonic() > deadline:
            return grown
        time.sleep(0.1)


def test_the_server_says_at_start_that_it_counts_in_compiled_mode(served):
    server, tmp = served
    log = (tmp / "server.log").read_text()
    line = f"moescope: counting the expert load of 4 MoE layers in compiled (DYNAMO_TRACE_ONCE) mode; " \
           f"{ExpertSeries(hottest=HOTTEST).count(L, E)} series on /metrics"
    assert line in log.splitlines()
    assert "enforce_eager=False" in log


def test_compiled_counts_are_tokens_times_k_and_equal_an_offline_capture(served, tmp_path):
    server, tmp = served
    before, table_before = scrape(server.url), table_counts(tmp / "load")
    base_tokens = per_layer(before, "moescope_layer_tokens_total")
    results = send(server, PROMPTS, MAX_TOKENS)
    sequences = fed_tokens(results)
    assert [r["prompt_token_ids"] for r in results] == PROMPTS
    n = sum(map(len, sequences))
    after = settled(server.url, base_tokens, n)
    assert (per_layer(after, "moescope_layer_tokens_total") - base_tokens == n).all()
    counted = table_settled(tmp / "load", table_before, n * K)  # [L, E] per-expert detail: the load table
    assert (counted.sum(axis=1) == n * K).all()

    trace = offline_capture(sequences, tmp_path / "hf")
    np.testing.assert_array_equal(counted, offline_load(trace, counted.shape))
    counted_entropy = per_layer(after, "moescope_routing_entropy_sum_total") - per_layer(before, "moescope_routing_entropy_sum_total")
    np.testing.assert_allclose(counted_entropy, offline_entropy_sum(trace), rtol=2e-3)  # HF's logits: float16-rounded


def test_series_are_per_layer_plus_the_hottest_ranks_asked_for(served):
    server, _ = served
    samples = scrape(server.url)
    names = {name: len(cells) for name, cells in samples.items()}
    assert "moescope_expert_tokens_total" not in names
    per_layer_names = ["moescope_layer_tokens_total", "moescope_routing_entropy_sum_total", "moescope_balancedness",
                       "moescope_max_expert_share", "moescope_load_entropy", "moescope_active_expert_fraction",
                       "moescope_routing_entropy", "moescope_layer_info"]
    assert {name: names.get(name) for name in per_layer_names} == dict.fromkeys(per_layer_names, L)
    assert names["moescope_hot_expert"] == names["moescope_hot_expert_share"] == L * HOTTEST
    assert sum(names.values()) == ExpertSeries(hottest=HOTTEST).count(L, E) == 8 * L + 1 + 2 * L * HOTTEST


def test_window_gauges_cover_the_last_window_and_empty_out_when_idle(served):
    server, tmp = served
    time.sleep(WINDOW + 0.5)  # the window forgets earlier tests' tokens
    idle, table_idle = scrape(server.url), table_counts(tmp / "load")
    assert np.isnan(per_layer(idle, "moescope_balancedness")).all()
    started = time.monotonic()
    results = [post_completion(server, prompt, 1) for prompt in PROMPTS[2:4]]
    n = sum(map(len, fed_tokens(results)))
    after = settled(server.url, per_layer(idle, "moescope_layer_tokens_total"), n)
    load = table_settled(tmp / "load", table_idle, n * K)  # [L, E]: the window's load, from the load table
    if time.monotonic() - started > WINDOW - 1:
        pytest.fail("the burst took longer than the window on this machine; the window no longer holds all of it")
    np.testing.assert_allclose(per_layer(after, "moescope_balancedness"), load.mean(1) / load.max(1), rtol=1e-12)
    np.testing.assert_allclose(per_layer(after, "moescope_max_expert_share"), load.max(1) / (n * K), rtol=1e-12)
    np.testing.assert_allclose(per_layer(after, "moescope_active_expert_fraction"), (load > 0).sum(1) / E, rtol=1e-12)
    share = load / load.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(share > 0, share * np.log(share), 0.0).sum(1) / np.log(E)
    np.testing.assert_allclose(per_layer(after, "moescope_load_entropy"), h, rtol=1e-12)
    entropy = (per_layer(after, "moescope_routing_entropy_sum_total") - per_layer(idle, "moescope_routing_entropy_sum_total")) / n
    np.testing.assert_allclose(per_layer(after, "moescope_routing_entropy"), entropy, rtol=1e-9)
    for layer in range(L):  # the hottest-expert ranks: the window's busiest experts, ties to the lower id
        ranked = sorted(range(E), key=lambda e: (-load[layer, e], e))[:HOTTEST]
        got = [samples_at(after, "moescope_hot_expert", layer, r) for r in (1, 2)]
        assert got == ranked
        shares = [samples_at(after, "moescope_hot_expert_share", layer, r) for r in (1, 2)]
        np.testing.assert_allclose(shares, load[layer, ranked] / (n * K), rtol=1e-12)
    time.sleep(WINDOW + 0.5)
    later = scrape(server.url)
    assert np.isnan(per_layer(later, "moescope_balancedness")).all()
    assert WINDOW - 0.5 <= later["moescope_window_seconds"][()] <= WINDOW + 1.0


def samples_at(samples: dict, name: str, layer: int, rank: int) -> float:
    return samples[name][(("layer", str(layer)), ("rank", str(rank)))]


def test_top_once_shows_balancedness_hottest_experts_and_tokens_per_second(served):
    server, _ = served
    load = send_in_background(server, PROMPTS[1:3], [3, 1], seconds=LOAD_SECONDS)
    try:
        wait_until_tokens_flow(server.url)  # the client's start-up alone can outlast a fixed sleep on a busy machine
        result = top_once_under_load(server.url)
    finally:
        stop_load(load)
    assert result.returncode == 0, result.stderr
    check_frame(result.stdout, n_hot=HOTTEST, from_window=True)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
def test_top_redraws_live_under_tmux_and_quits_on_ctrl_c(served):
    server, _ = served
    session = f"moescope-top-{os.getpid()}"
    command = f"{sys.executable} -m moescope.cli.main top {server.url} --interval 0.5; echo moescope-top-exit=$?; sleep 60"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "20", command], check=True)
    load = send_in_background(server, PROMPTS[1:3], [3, 1], seconds=LOAD_SECONDS)
    try:
        def pane() -> str:
            return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout

        deadline, screen = time.monotonic() + 300, ""  # a good frame comes in seconds; CI has stalled for minutes
        while time.monotonic() < deadline:
            screen = pane()
            if "tokens/s" in screen and "n/a" not in screen and "tokens/s 0.0" not in screen:
                break
            time.sleep(0.25)
        check_frame(screen, n_hot=HOTTEST, from_window=True)
        assert screen.count("moescope top") == 1  # redrawn in place, not scrolled
        subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], check=True)
        deadline = time.monotonic() + 120
        while "moescope-top-exit=" not in (screen := pane()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "moescope-top-exit=0" in screen, screen
    finally:
        stop_load(load)
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_the_server_stops_cleanly(served):
    server, _ = served
    assert server.stop() == 0
    assert not server.group_alive()  # engine core and workers are gone too
    result = run_top(server.url, "--once")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: cannot reach {server.url}/metrics: [Errno 111] Connection refused"]


def test_the_plugin_keeps_vllm_from_loading_a_graph_compiled_without_the_counters(tmp_path):
    """vLLM (torch >= 2.10) loads an AOT-compiled graph from its cache by default, keyed by its own settings only:
    one cached by a server without the plugin would run without counting. register() turns the cache off."""
    code = ("import os, vllm.envs as envs; before = envs.VLLM_USE_AOT_COMPILE; "
            "from moescope.serve.vllm_plugin import register; register(); "
            "print(before, envs.VLLM_USE_AOT_COMPILE, envs.VLLM_DISABLE_COMPILE_CACHE)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "MOESCOPE_"))}
    result = subprocess.run([str(vllm_python()), "-c", code], capture_output=True, text=True, timeout=300,
                            env={**env, "MOESCOPE_VLLM_METRICS": "1", "MOESCOPE_VLLM_METRICS_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "False", "True"]
