"""What the plugin's server tests (compiled and eager) share: reading /metrics and the load table, and the
offline Hugging Face capture of the same tokens that the counts are checked against."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import moescope
from moescope.trace.load_table import read_load_table

RNG = np.random.default_rng(15)
LENGTHS = [1, 7, 33, 120, 256]  # awkward sizes, one prompt each
PROMPTS = [RNG.integers(3, 8000, n).tolist() for n in LENGTHS]
MAX_TOKENS = [1, 4, 1, 6, 2]


def scrape(url: str) -> dict:
    """{sample name: {label tuple: value}} of the moescope samples on /metrics."""
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


def table_counts(folder: Path, shape=(4, 8)) -> np.ndarray:
    """int64 [L, E]: the load table's windows summed (zeros while the server has written none)."""
    if not folder.is_dir() or not any(folder.glob("*.parquet")):
        return np.zeros(shape, np.int64)
    return read_load_table(folder).matrix


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


def offline_load(trace, shape) -> np.ndarray:
    """float64 [L, E] slots per expert in a trace, counted by DuckDB (not moescope's kernels)."""
    rows = duckdb.sql(f"select layer, e, count(*) c from (select layer, unnest(topk_ids) e from "
                      f"read_parquet('{trace.folder}/routing/*.parquet')) group by all").fetchall()
    out = np.zeros(shape)
    for layer, expert, c in rows:
        out[layer, expert] = c
    return out


def offline_entropy_sum(trace) -> np.ndarray:
    """float64 [L]: sum over the trace's tokens of H(softmax(router logits)), in float64 NumPy."""
    logits = duckdb.sql(f"select layer, router_output from read_parquet('{trace.folder}/routing/*.parquet') "
                        "order by layer").fetchnumpy()
    p = torch.softmax(torch.tensor(np.stack(logits["router_output"]), dtype=torch.float64), -1).numpy()  # [L*T, E]
    entropy = -(p * np.log(p)).sum(-1)
    return np.bincount(logits["layer"].astype(int), weights=entropy)  # [L]


TOP_PATIENCE_S = 600.0  # top ends in ~3 s; the CI machine has stalled processes for minutes (stacks below)


def run_top(url: str, *args: str) -> subprocess.CompletedProcess:
    """`moescope top URL ARGS` in a child. One that has not ended in TOP_PATIENCE_S fails the test with what
    the machine was doing (the child's state and CPU time, the busiest processes) and its Python stacks."""
    import signal

    top = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "moescope.cli.main", "top", url, *args],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = top.communicate(timeout=TOP_PATIENCE_S)
    except subprocess.TimeoutExpired:
        machine = machine_report(top.pid)
        top.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack on stderr
        out, err = top.communicate()
        pytest.fail(f"moescope top did not end in {TOP_PATIENCE_S:.0f} s\n{machine}\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(top.args, top.returncode, out, err)


def top_once_under_load(url: str) -> subprocess.CompletedProcess:
    """`moescope top URL --once --interval 2` while a background load runs. A frame measured across a stall of the
    machine (no token in those 2 s) shows `tokens/s 0.0`; up to two more frames are taken then, so a top that
    always shows 0 still fails."""
    for _ in range(3):
        result = run_top(url, "--once", "--interval", "2")
        if result.returncode != 0 or not re.search(r"tokens/s 0\.0$", result.stdout, re.MULTILINE):
            break
    return result


def machine_report(pid: int) -> str:
    """The process's state, CPU seconds and kernel wait channel, the load average, and the 8 processes that have
    used the most CPU (from /proc): tells a starved process from a stuck one."""
    ticks = os.sysconf("SC_CLK_TCK")

    def stat(p: str) -> tuple[str, str, float] | None:
        try:
            text = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            return None
        name, rest = text[text.index("(") + 1: text.rindex(")")], text[text.rindex(")") + 2:].split()
        return name, rest[0], (int(rest[11]) + int(rest[12])) / ticks  # comm, state, utime + stime

    own = stat(str(pid))
    wchan = Path(f"/proc/{pid}/wchan").read_text() if Path(f"/proc/{pid}/wchan").exists() else "?"
    busiest = sorted((s[2], p, s[0], s[1]) for p in os.listdir("/proc") if p.isdigit() and (s := stat(p)))[-8:]
    lines = [f"top (pid {pid}): state {own and own[1]}, {own and own[2]:.2f} CPU-s, wchan {wchan!r}",
             f"load average: {Path('/proc/loadavg').read_text().strip()}",
             "busiest processes (CPU-s, pid, name, state):"]
    lines += [f"  {cpu:9.1f} {p:>7} {name} {state}" for cpu, p, name, state in reversed(busiest)]
    return "\n".join(lines)


def check_frame(text: str, n_hot: int, from_window: bool) -> None:
    """A frame of `moescope top`: 4 layers with window figures in range and the `n_hot` hottest experts."""
    lines = text.splitlines()
    assert "4 MoE layers x 8 experts, top-2" in text, text
    rate = float(text.split("tokens/s ")[1].split()[0].replace(",", ""))
    assert rate > 0, text
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["layer"])
    rows = [line.split() for line in lines[header + 1:] if line.strip()]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3], text
    for row in rows:
        balancedness, max_share, active, load_entropy = float(row[1]), float(row[2][:-1]), float(row[3][:-1]), float(row[4])
        assert 0 < balancedness <= 1 and 0 < load_entropy <= 1 and 0 < max_share <= 100 and 0 < active <= 100
        shares = [float(x.rstrip("%")) for x in row[7::2]]
        assert len(shares) == n_hot and shares == sorted(shares, reverse=True) and sum(shares) <= 100.5
        if from_window:  # the server's window ranks: the busiest is the max expert share (a scrape may fall
            assert shares[0] == pytest.approx(max_share, abs=5)  # between two gauges of one publication)


# The load behind 'top' runs until the test has seen what it needs, then is stopped: a fixed length would race
# top's own start-up on a busy machine (the window it measures could open after the load ended).
LOAD_SECONDS = 600


def stop_load(load: subprocess.Popen) -> None:
    load.terminate()
    load.wait(timeout=60)


def wait_until_tokens_flow(url: str, timeout: float = 120.0) -> None:
    """Return once layer 0's token counter has grown since the call: the background load is really running."""
    before = per_layer(scrape(url), "moescope_layer_tokens_total")[0]
    deadline = time.monotonic() + timeout
    while per_layer(scrape(url), "moescope_layer_tokens_total")[0] == before:
        assert time.monotonic() < deadline, "the background load sent nothing"
        time.sleep(0.1)
