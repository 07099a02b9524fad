"""moescope's vLLM plugin inside a real `vllm serve` of moescope:tiny-moe on loopback (.venv-vllm).

One server for the module (half a minute to start on a quiet machine): requests go through the openai client
in vLLM's environment (tests/serve/send_requests.py), /metrics is parsed with prometheus_client's own parser,
and the counts are checked against the tokens sent and an offline Hugging Face capture of the same tokens.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import duckdb
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import moescope
from moescope.trace.load_table import read_load_table
from serve_helpers import post_completion, send, send_in_background, start_server

pytestmark = pytest.mark.vllm

WINDOW = 6.0  # seconds of the server's sliding window (and of each load-table window)
RNG = np.random.default_rng(15)
LENGTHS = [1, 7, 33, 120, 256]  # awkward sizes, one prompt each
PROMPTS = [RNG.integers(3, 8000, n).tolist() for n in LENGTHS]
MAX_TOKENS = [1, 4, 1, 6, 2]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    env = {"MOESCOPE_VLLM_INTERVAL_S": "0.2", "MOESCOPE_VLLM_WINDOW_S": str(WINDOW),
           "MOESCOPE_VLLM_LOAD_TABLE": str(tmp / "load")}
    server = start_server(tmp / "server.log", plugin=True, env=env)
    yield server, tmp
    server.stop()


def scrape(url: str) -> dict:
    """{sample name: {label tuple: value}} of the moescope samples on /metrics."""
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("moescope_"):
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def expert_counts(samples: dict) -> np.ndarray:
    """float64 [L, E] from moescope_expert_tokens_total."""
    cells = {(int(dict(k)["layer"]), int(dict(k)["expert"])): v for k, v in samples["moescope_expert_tokens_total"].items()}
    L, E = 1 + max(l for l, _ in cells), 1 + max(e for _, e in cells)
    out = np.zeros((L, E))
    for (l, e), v in cells.items():
        out[l, e] = v
    return out


def per_layer(samples: dict, name: str) -> np.ndarray:
    cells = {int(dict(k)["layer"]): v for k, v in samples[name].items()}
    return np.array([cells[l] for l in range(len(cells))])


def settled(url: str, tokens_more_than: np.ndarray, expected: int, timeout: float = 60.0) -> dict:
    """Scrape until every layer counted `expected` more tokens than `tokens_more_than` (counters update every 0.2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        grown = per_layer(samples, "moescope_layer_tokens_total") - tokens_more_than
        if (grown == expected).all() or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def fed_tokens(results: list[dict]) -> list[list[int]]:
    """The tokens vLLM routed per request: the prompt and every generated token but the last (never fed back)."""
    return [r["prompt_token_ids"] + r["token_ids"][:-1] for r in results]


def offline_capture(sequences: list[list[int]], out):
    width = max(map(len, sequences))
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    return moescope.capture("moescope:tiny-moe", input_ids=ids, attention_mask=mask, out=out, progress=False,
                            options=moescope.CaptureOptions(dtype="float32", save_logits=True))


def test_counts_are_tokens_times_layers_times_k_and_equal_an_offline_capture(served, tmp_path):
    server, _ = served
    before = scrape(server.url)
    base_experts, base_tokens = expert_counts(before), per_layer(before, "moescope_layer_tokens_total")
    results = send(server, PROMPTS, MAX_TOKENS)
    sequences = fed_tokens(results)
    assert [r["prompt_token_ids"] for r in results] == PROMPTS
    n = sum(map(len, sequences))
    after = settled(server.url, base_tokens, n)
    counted = expert_counts(after) - base_experts  # [L, E]
    L, k = counted.shape[0], 2
    assert (per_layer(after, "moescope_layer_tokens_total") - base_tokens == n).all()
    assert (counted.sum(axis=1) == n * k).all() and counted.sum() == n * L * k

    trace = offline_capture(sequences, tmp_path / "hf")
    rows = duckdb.sql(f"select layer, e, count(*) c from (select layer, unnest(topk_ids) e from "
                      f"read_parquet('{trace.folder}/routing/*.parquet')) group by all").fetchall()
    offline = np.zeros_like(counted)
    for layer, expert, c in rows:
        offline[layer, expert] = c
    np.testing.assert_array_equal(counted, offline)

    logits = duckdb.sql(f"select layer, router_output from read_parquet('{trace.folder}/routing/*.parquet') "
                        "order by layer").fetchnumpy()
    p = torch.softmax(torch.tensor(np.stack(logits["router_output"]), dtype=torch.float64), -1).numpy()  # [L*T, E]
    entropy = -(p * np.log(p)).sum(-1)
    offline_entropy = np.bincount(logits["layer"].astype(int), weights=entropy)  # [L]
    counted_entropy = per_layer(after, "moescope_routing_entropy_sum_total") - per_layer(before, "moescope_routing_entropy_sum_total")
    np.testing.assert_allclose(counted_entropy, offline_entropy, rtol=2e-3)  # HF's logits are stored float16-rounded


def test_window_gauges_cover_the_last_window_and_empty_out_when_idle(served):
    server, _ = served
    time.sleep(WINDOW + 0.5)  # the window forgets earlier tests' tokens
    idle = scrape(server.url)
    assert np.isnan(per_layer(idle, "moescope_balancedness")).all()
    started = time.monotonic()
    results = [post_completion(server, prompt, 1) for prompt in PROMPTS[2:4]]
    n = sum(map(len, fed_tokens(results)))
    after = settled(server.url, per_layer(idle, "moescope_layer_tokens_total"), n)
    if time.monotonic() - started > WINDOW - 1:
        pytest.fail("the burst took longer than the window on this machine; the window no longer holds all of it")
    load = expert_counts(after) - expert_counts(idle)  # [L, E]: the window's load, computed here independently
    np.testing.assert_allclose(per_layer(after, "moescope_balancedness"), load.mean(1) / load.max(1), rtol=1e-12)
    share = load / load.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(share > 0, share * np.log(share), 0.0).sum(1) / np.log(load.shape[1])
    np.testing.assert_allclose(per_layer(after, "moescope_load_entropy"), h, rtol=1e-12)
    entropy = (per_layer(after, "moescope_routing_entropy_sum_total") - per_layer(idle, "moescope_routing_entropy_sum_total")) / n
    np.testing.assert_allclose(per_layer(after, "moescope_routing_entropy"), entropy, rtol=1e-9)
    time.sleep(WINDOW + 0.5)
    later = scrape(server.url)
    assert np.isnan(per_layer(later, "moescope_balancedness")).all()
    assert WINDOW - 0.5 <= later["moescope_window_seconds"][()] <= WINDOW + 1.0


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
    assert len(table.windows) >= 2 and (table.tokens.sum(axis=(1, 2)) > 0).all()  # idle windows write nothing


def _top(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moescope.cli.main", "top", url, *args], capture_output=True,
                          text=True, timeout=120)


def _check_frame(text: str) -> None:
    lines = text.splitlines()
    assert "4 MoE layers x 8 experts, top-2" in text, text
    rate = float(text.split("tokens/s ")[1].split()[0].replace(",", ""))
    assert rate > 0, text
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["layer"])
    rows = [line.split() for line in lines[header + 1:] if line.strip()]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3], text
    for row in rows:
        balancedness, load_entropy = float(row[1]), float(row[2])
        assert 0 < balancedness <= 1 and 0 < load_entropy <= 1
        shares = [float(x.rstrip("%")) for x in row[5::2]]
        assert len(shares) == 3 and shares == sorted(shares, reverse=True) and sum(shares) <= 100.5


# The load behind 'top' runs until the test has seen what it needs, then is stopped: a fixed length would race
# top's own start-up on a busy machine (the window it measures could open after the load ended).
LOAD_SECONDS = 600


def _stop(load: subprocess.Popen) -> None:
    load.terminate()
    load.wait(timeout=60)


def _wait_until_tokens_flow(url: str, timeout: float = 120.0) -> None:
    """Return once layer 0's token counter has grown since the call: the background load is really running."""
    before = per_layer(scrape(url), "moescope_layer_tokens_total")[0]
    deadline = time.monotonic() + timeout
    while per_layer(scrape(url), "moescope_layer_tokens_total")[0] == before:
        assert time.monotonic() < deadline, "the background load sent nothing"
        time.sleep(0.1)


def test_top_once_shows_balancedness_hottest_experts_and_tokens_per_second(served):
    server, _ = served
    load = send_in_background(server, PROMPTS[1:3], [3, 1], seconds=LOAD_SECONDS)
    try:
        _wait_until_tokens_flow(server.url)  # the client's start-up alone can outlast a fixed sleep on a busy machine
        result = _top(server.url, "--once", "--interval", "2")
    finally:
        _stop(load)
    assert result.returncode == 0, result.stderr
    _check_frame(result.stdout)


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

        deadline, screen = time.monotonic() + 60, ""
        while time.monotonic() < deadline:
            screen = pane()
            if "tokens/s" in screen and "n/a" not in screen and "tokens/s 0.0" not in screen:
                break
            time.sleep(0.25)
        _check_frame(screen)
        assert screen.count("moescope top") == 1  # redrawn in place, not scrolled
        subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], check=True)
        deadline = time.monotonic() + 20
        while "moescope-top-exit=" not in (screen := pane()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "moescope-top-exit=0" in screen, screen
    finally:
        _stop(load)
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_the_server_stops_cleanly(served):
    server, _ = served
    assert server.stop() == 0
    assert not server.group_alive()  # engine core and workers are gone too
    result = _top(server.url, "--once")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: cannot reach {server.url}/metrics: [Errno 111] Connection refused"]
