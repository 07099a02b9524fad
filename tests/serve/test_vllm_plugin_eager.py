"""moescope's vLLM plugin in a real `vllm serve --enforce-eager` of moescope:tiny-moe, with every expert's counter
on /metrics (MOESCOPE_VLLM_EXPERT_SERIES=all): the counts of test_vllm_plugin.py (compiled) in eager mode, the
load table against the counters, and `moescope top` reading the expert counters. One server for the module."""

from __future__ import annotations

import time

import numpy as np
import pytest

from moescope.trace.load_table import read_load_table
from plugin_checks import (LOAD_SECONDS, MAX_TOKENS, PROMPTS, check_frame, expert_counts, fed_tokens,
                           offline_capture, offline_entropy_sum, offline_load, per_layer, scrape, settled,
                           stop_load, top_once_under_load, wait_until_tokens_flow)
from serve_helpers import send, send_in_background, start_server

pytestmark = pytest.mark.vllm

K = 2


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-eager")
    env = {"MOESCOPE_VLLM_INTERVAL_S": "0.2", "MOESCOPE_VLLM_WINDOW_S": "6", "MOESCOPE_VLLM_LOAD_TABLE": str(tmp / "load"),
           "MOESCOPE_VLLM_EXPERT_SERIES": "all"}
    server = start_server(tmp / "server.log", plugin=True, env=env, eager=True)
    yield server, tmp
    assert server.stop() == 0


def test_eager_counts_are_tokens_times_k_and_equal_an_offline_capture(served, tmp_path):
    server, tmp = served
    assert "moescope: counting the expert load of 4 MoE layers in eager mode; 65 series on /metrics" in \
        (tmp / "server.log").read_text().splitlines()
    before = scrape(server.url)
    base_experts, base_tokens = expert_counts(before), per_layer(before, "moescope_layer_tokens_total")
    results = send(server, PROMPTS, MAX_TOKENS)
    sequences = fed_tokens(results)
    n = sum(map(len, sequences))
    after = settled(server.url, base_tokens, n)
    counted = expert_counts(after) - base_experts  # [L, E]
    assert (per_layer(after, "moescope_layer_tokens_total") - base_tokens == n).all()
    assert (counted.sum(axis=1) == n * K).all()
    trace = offline_capture(sequences, tmp_path / "hf")
    np.testing.assert_array_equal(counted, offline_load(trace, counted.shape))
    counted_entropy = per_layer(after, "moescope_routing_entropy_sum_total") - per_layer(before, "moescope_routing_entropy_sum_total")
    np.testing.assert_allclose(counted_entropy, offline_entropy_sum(trace), rtol=2e-3)


def test_load_table_windows_add_up_to_the_counters(served):
    server, tmp = served
    send(server, PROMPTS[:2], [1, 1])
    deadline = time.monotonic() + 30
    while True:
        samples = scrape(server.url)
        table = read_load_table(tmp / "load")
        if np.array_equal(table.matrix, expert_counts(samples)) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    np.testing.assert_array_equal(table.matrix, expert_counts(samples))
    assert (table.tokens.sum(axis=(1, 2)) > 0).all()  # idle windows write nothing


def test_top_reads_the_expert_counters(served):
    server, _ = served
    load = send_in_background(server, PROMPTS[1:3], [3, 1], seconds=LOAD_SECONDS)
    try:
        wait_until_tokens_flow(server.url)
        result = top_once_under_load(server.url)
    finally:
        stop_load(load)
    assert result.returncode == 0, result.stderr
    check_frame(result.stdout, n_hot=3, from_window=False)
