"""Where vLLM runs the model (engine core or worker): count expert load at the selection point, publish it.

    step start (outside any compiled graph):  rows[] = query_start_loc[R]; seen[:] = 0
    _compute_routing (recording/vllm_worker.py's SelectionPoint; inside vLLM's compiled graph when compiled):
        real = seen[layer] + arange(N) < rows          [N] padding rows after the step's tokens are never counted
        counts[layer, ids[real]] += 1; tokens[layer] += real.sum(); entropy_sum[layer] += sum H(softmax(logits[real]))
        seen[layer] += N                               (a layer may route one step in pieces)
    publisher thread: every `interval` s copy the counters, keep the copies of the last `window` s, and write
                      the per-layer series (and the per-expert ones asked for, metrics.ExpertSeries) to
                      prometheus_client's multiprocess files; optionally one load-table file per window of
                      `window` s (trace/load_table.py), rewritten at each publication while its window runs

The counting is tensor work on buffers made once, with no Python branch on values and no host sync, so it is
the same whether vLLM runs the model eagerly, traces it once into a compiled graph (Python around the router
then runs only at tracing time: the CPU platform's default) or replays a CUDA graph. The only Python per step is
the step-start bookkeeping, in a forward pre-hook of the outer model module, which vLLM calls eagerly. The dummy
batches vLLM runs while starting (profiling, warm-up, graph capture) have no request: rows = 0, nothing counts.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moescope.recording.vllm_worker import SelectionPoint, step_requests
from moescope.serve import metrics


@dataclass(frozen=True)
class MonitorOptions:
    folder: str  # prometheus_client multiprocess folder /metrics reads
    window: float = 60.0  # seconds the window gauges cover
    interval: float = 1.0  # seconds between publications
    load_table: str | None = None  # folder for one load-table file per window, or None
    expert_series: metrics.ExpertSeries = field(default_factory=metrics.ExpertSeries)


@dataclass
class Snapshot:
    time: float
    counts: np.ndarray  # int64 [L, E]
    entropy_sum: np.ndarray  # float64 [L]
    tokens: np.ndarray  # int64 [L]


class LoadCounter:
    """Device-side accumulators fed at vLLM's selection point; `snapshot()` copies them to the host."""

    def __init__(self, n_experts: list[int], top_k: list[int], device="cpu"):
        self.n_experts, self.top_k = list(n_experts), list(top_k)
        L, E = len(self.n_experts), max(self.n_experts)
        self.counts = torch.zeros(L, E, dtype=torch.int64, device=device)  # [L, E]
        self.entropy_sum = torch.zeros(L, dtype=torch.float64, device=device)  # [L]
        self.tokens = torch.zeros(L, dtype=torch.int64, device=device)  # [L]
        self.rows = torch.zeros((), dtype=torch.int64, device=device)  # real rows of the running step
        self.seen = torch.zeros(L, dtype=torch.int64, device=device)  # rows each layer has routed in this step
        self.runner = self.point = None

    @classmethod
    def for_runner(cls, runner) -> "LoadCounter":
        """Counters sized for the model of vLLM's model runner `runner`, ready to `install` at its selection point."""
        point = SelectionPoint(runner.model)
        if not point.routers:
            raise RuntimeError("moescope: this vLLM model has no fused-MoE router to count")
        routers = point.routers.values()
        counter = cls([int(r.global_num_experts) for r in routers], [int(r.top_k) for r in routers],
                      next(runner.model.parameters()).device)
        counter.runner, counter.point = runner, point
        return counter

    def install(self) -> None:
        self.point.install(self._new_step, self.count)

    def uninstall(self) -> None:
        self.point.uninstall()

    def _new_step(self, module, args, kwargs) -> None:
        _, starts = step_requests(self.runner)
        self.start_step(int(starts[-1]))

    def start_step(self, rows: int) -> None:
        """Outside the graph, before each forward: the step's first `rows` rows are tokens, the rest padding."""
        self.rows.fill_(rows)
        self.seen.zero_()

    def count(self, layer: int, router_logits, weights, ids) -> None:
        """router_logits [N, E], ids [N, k] of one routing call. Traced into vLLM's compiled graph: only tensor ops
        on the persistent buffers, no branch on values (`layer` is a constant there)."""
        n, k = ids.shape
        real = self.seen[layer] + torch.arange(n, device=ids.device) < self.rows  # [n]
        self.seen[layer] += n
        slots = real[:, None].expand(n, k).reshape(-1).long()  # [n * k] 1 for a real row's slot, 0 for padding
        self.counts[layer].index_add_(0, ids.reshape(-1).long(), slots)  # fixed size: no host sync, unlike bincount
        h = torch.special.entr(torch.softmax(router_logits.float(), dim=-1)).sum(dim=-1)  # [n]
        self.entropy_sum[layer] += torch.where(real, h.double(), 0.0).sum()
        self.tokens[layer] += real.sum()

    def snapshot(self) -> Snapshot:
        # a host tensor is copied by NumPy, so the publisher thread runs no torch kernel beside the model's
        copy = [t.numpy().copy() if t.device.type == "cpu" else t.cpu().numpy()
                for t in (self.counts, self.entropy_sum, self.tokens)]
        return Snapshot(time.monotonic(), *copy)


class Publisher:
    """Writes the counter's totals and sliding-window gauges every `interval` seconds, on its own thread."""

    def __init__(self, counter: LoadCounter, opts: MonitorOptions):
        from moescope.serve.prometheus_files import PrometheusFiles

        self.counter, self.opts = counter, opts
        self.files = PrometheusFiles(opts.folder, metrics.HELP)
        self.history: collections.deque[Snapshot] = collections.deque()
        self.dump_base = counter.snapshot()  # the start of the load-table window being filled
        self.dump_index = 0
        self.history.append(self.dump_base)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="moescope-load-publisher", daemon=True)
        for layer, (e, k) in enumerate(zip(counter.n_experts, counter.top_k)):
            self.files.gauge(metrics.LAYER_INFO, {"layer": str(layer), "n_experts": str(e), "top_k": str(k)}, 1.0,
                             time.time())

    def start(self) -> None:
        self.publish()
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.opts.interval):
            self.publish()

    def publish(self) -> None:
        with self.lock:
            now = self.counter.snapshot()
            self.history.append(now)
            while len(self.history) > 1 and now.time - self.history[1].time >= self.opts.window:
                self.history.popleft()  # keep the newest copy at least `window` old as the window's start
            self._write(now, self.history[0])
            if self.opts.load_table:
                self._dump(now)

    def _write(self, now: Snapshot, base: Snapshot) -> None:
        stamp, series = time.time(), self.opts.expert_series
        L = len(now.tokens)
        load = now.counts - base.counts  # [L, E] the window's load
        for layer in range(L):
            labels = {"layer": str(layer)}
            self.files.counter(metrics.LAYER_TOKENS, labels, now.tokens[layer])
            self.files.counter(metrics.ENTROPY_SUM, labels, now.entropy_sum[layer])
            if series.all:
                for expert in range(self.counter.n_experts[layer]):
                    self.files.counter(metrics.EXPERT_TOKENS, {"layer": str(layer), "expert": str(expert)},
                                       now.counts[layer, expert])
        stats = metrics.window_stats(load, now.entropy_sum - base.entropy_sum, now.tokens - base.tokens,
                                     np.asarray(self.counter.n_experts))
        for name, values in stats.items():
            for layer in range(L):
                self.files.gauge(name, {"layer": str(layer)}, values[layer], stamp)
        if series.hottest:
            ids, shares = metrics.hottest(load, series.hottest)  # [L, N]
            for layer in range(L):
                for rank in range(ids.shape[1]):
                    labels = {"layer": str(layer), "rank": str(rank + 1)}
                    self.files.gauge(metrics.HOT_EXPERT, labels, ids[layer, rank], stamp)
                    self.files.gauge(metrics.HOT_EXPERT_SHARE, labels, shares[layer, rank], stamp)
        self.files.gauge(metrics.WINDOW_SECONDS, {}, now.time - base.time, stamp)

    def _dump(self, now: Snapshot) -> None:
        """(Re)write the running window's file: a server killed mid-window loses at most one interval."""
        from moescope.trace.load_table import write_load_table

        load = now.counts - self.dump_base.counts  # [L, E]
        if load.any():  # an idle window writes nothing; its index is skipped, marking the idle time
            folder = Path(self.opts.load_table)
            folder.mkdir(parents=True, exist_ok=True)
            write_load_table(folder / f"load-{self.dump_index:06d}.parquet", [self.dump_index], load[None])
        if now.time - self.dump_base.time >= self.opts.window:
            self.dump_index += 1
            self.dump_base = now

    def close(self) -> None:
        """Stop the thread and publish what was counted since its last run."""
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
        self.publish()
        self.files.close()
