"""`moescope top`: a terminal view of a vLLM server's live expert load (the plugin's /metrics, serve/metrics.py).

    scrape URL/metrics -> Prometheus text -> prometheus_client's parser -> Snapshot (arrays per layer/expert)
    two snapshots -> Frame text: per layer balancedness, max expert share, active experts, load entropy, routing
                     entropy, hottest experts; tokens/s

The per-layer figures are the server's sliding-window gauges and tokens/s the growth of layer 0's token counter
between two scrapes; these are there whatever the server's MOESCOPE_VLLM_EXPERT_SERIES. The hottest experts
come from the per-expert series when the server publishes them: with `all`, the counters' growth between two
scrapes (since the server started while it routed nothing in between); with N, the server's window ranks.
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import numpy as np

from moescope.errors import MoescopeError
from moescope.serve import metrics


class NoMoescopeMetrics(MoescopeError):
    """The address serves Prometheus metrics, but not moescope's."""


def metrics_url(url: str) -> str:
    """`host:port`, `http://host:port` or a full metrics URL -> the URL to scrape."""
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise MoescopeError(f"{url}: not an http(s) address of a server")
    return url if parts.path not in ("", "/") else urllib.parse.urlunsplit(parts._replace(path="/metrics"))


def fetch_text(url: str, timeout: float = 5.0) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as err:
        raise MoescopeError(f"{url}: the server answered HTTP {err.code} ({err.reason})") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise MoescopeError(f"cannot reach {url}: {reason}") from None


@dataclass(frozen=True)
class Snapshot:
    time: float  # time.monotonic() of the scrape
    experts: np.ndarray | None  # float64 [L, E] tokens per expert since the server started (EXPERT_SERIES=all)
    layer_tokens: np.ndarray  # float64 [L]
    balancedness: np.ndarray  # float64 [L] (window gauges; NaN while the window saw no token)
    max_share: np.ndarray
    active: np.ndarray
    load_entropy: np.ndarray
    routing_entropy: np.ndarray
    window_seconds: float
    top_k: np.ndarray  # int [L]
    n_experts: int  # the most experts of any layer
    hot_ids: np.ndarray | None  # int [L, N] the window's busiest experts (EXPERT_SERIES=N), -1 where idle
    hot_shares: np.ndarray | None  # float64 [L, N]


def parse_snapshot(text: str, url: str, at: float) -> Snapshot:
    """The moescope samples of one /metrics page (any other family is ignored)."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list] = {}
    try:
        for family in text_string_to_metric_families(text):
            if family.name.startswith(metrics.PREFIX):
                for sample in family.samples:
                    samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    except (ValueError, IndexError, TypeError) as err:
        raise MoescopeError(f"{url}: not Prometheus metrics text ({err})") from None
    info = samples.get(metrics.LAYER_INFO)
    if not info:
        raise NoMoescopeMetrics(f"{url} serves no moescope metrics: start the vLLM server with MOESCOPE_VLLM_METRICS=1 "
                                "and moescope installed in its environment")
    L = 1 + max(int(labels["layer"]) for labels, _ in info)
    E = max(int(labels["n_experts"]) for labels, _ in info)
    top_k = np.zeros(L, int)
    for labels, _ in info:
        top_k[int(labels["layer"])] = int(labels["top_k"])
    experts = None
    if metrics.EXPERT_TOKENS + "_total" in samples:
        experts = np.zeros((L, E))
        for labels, value in samples[metrics.EXPERT_TOKENS + "_total"]:
            experts[int(labels["layer"]), int(labels["expert"])] = value
    hot_ids = hot_shares = None
    if metrics.HOT_EXPERT in samples:
        N = max(int(labels["rank"]) for labels, _ in samples[metrics.HOT_EXPERT])
        hot_ids, hot_shares = np.full((L, N), -1), np.full((L, N), np.nan)
        for labels, value in samples[metrics.HOT_EXPERT]:
            hot_ids[int(labels["layer"]), int(labels["rank"]) - 1] = -1 if np.isnan(value) else int(value)
        for labels, value in samples.get(metrics.HOT_EXPERT_SHARE, []):
            hot_shares[int(labels["layer"]), int(labels["rank"]) - 1] = value

    def per_layer(name: str) -> np.ndarray:
        out = np.full(L, np.nan)
        for labels, value in samples.get(name, []):
            out[int(labels["layer"])] = value
        return out

    window = samples.get(metrics.WINDOW_SECONDS, [({}, np.nan)])[0][1]
    return Snapshot(at, experts, per_layer(metrics.LAYER_TOKENS + "_total"), per_layer(metrics.BALANCEDNESS),
                    per_layer(metrics.MAX_EXPERT_SHARE), per_layer(metrics.ACTIVE_EXPERT_FRACTION),
                    per_layer(metrics.LOAD_ENTROPY), per_layer(metrics.ROUTING_ENTROPY), float(window), top_k,
                    E, hot_ids, hot_shares)


def scrape(url: str, timeout: float = 5.0) -> Snapshot:
    return parse_snapshot(fetch_text(url, timeout), url, time.monotonic())


def hottest_column(cur: Snapshot, prev: Snapshot | None, hottest: int) -> tuple[str, list[str]] | None:
    """The hottest experts of each layer, from whichever per-expert series the server publishes (None: none)."""
    if cur.experts is not None:
        grew = (prev is not None and prev.experts is not None and prev.experts.shape == cur.experts.shape
                and (cur.experts > prev.experts).any())
        load = cur.experts - prev.experts if grew else cur.experts  # [L, E]
        span = f"last {cur.time - prev.time:.1f} s" if grew else "since start"
        ids, shares = metrics.hottest(load, hottest)  # [L, n]
    elif cur.hot_ids is not None:
        span = "window"
        ids, shares = cur.hot_ids[:, :hottest], cur.hot_shares[:, :hottest]
    else:
        return None
    cells = ["  ".join(f"e{e} {s:4.0%}" for e, s in zip(ids[layer], shares[layer]) if e >= 0) or "-"
             for layer in range(len(ids))]
    return f"hottest experts ({span}, share of slots)", cells


def render(url: str, cur: Snapshot, prev: Snapshot | None = None, hottest: int = 3) -> str:
    """One frame of text: header, tokens/s, then one row per MoE layer."""
    L = len(cur.top_k)
    rate = "n/a (one scrape)" if prev is None else f"{(cur.layer_tokens[0] - prev.layer_tokens[0]) / max(cur.time - prev.time, 1e-9):,.1f}"
    k = sorted(set(cur.top_k.tolist()))
    column = hottest_column(cur, prev, hottest)
    lines = [
        f"moescope top  {url}",
        f"{L} MoE layers x {cur.n_experts} experts, top-{'/'.join(map(str, k))}   window {cur.window_seconds:.0f} s   "
        f"tokens routed {cur.layer_tokens[0]:,.0f}   tokens/s {rate}",
        "",
        f"{'layer':>5}  {'balancedness':>12}  {'max share':>9}  {'active':>6}  {'load entropy':>12}  "
        f"{'routing entropy':>15}  {column[0] if column else ''}".rstrip(),
    ]
    for layer in range(L):
        lines.append(f"{layer:>5}  {cur.balancedness[layer]:>12.3f}  {cur.max_share[layer]:>9.0%}  "
                     f"{cur.active[layer]:>6.0%}  {cur.load_entropy[layer]:>12.3f}  {cur.routing_entropy[layer]:>15.3f}  "
                     f"{column[1][layer] if column else ''}".rstrip())
    if column is None:
        lines += ["", "hottest experts: not on /metrics (start the server with MOESCOPE_VLLM_EXPERT_SERIES=N or all)"]
    return "\n".join(lines)


def run_top(url: str, *, interval: float = 2.0, once: bool = False, out=sys.stdout) -> int:
    """Refresh a frame every `interval` seconds until interrupted; `once`: one frame from two scrapes."""
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C quits, even if our parent ignored SIGINT
    url = metrics_url(url)
    prev = scrape(url)
    try:
        if not once:
            print("\x1b[H\x1b[2J" + render(url, prev), file=out, flush=True)
        while True:
            time.sleep(interval)
            cur = scrape(url)
            frame = render(url, cur, prev)
            if once:
                print(frame, file=out)
                return 0
            print("\x1b[H\x1b[2J" + frame, file=out, flush=True)  # home + clear: redraw in place
            prev = cur
    except KeyboardInterrupt:
        return 0
