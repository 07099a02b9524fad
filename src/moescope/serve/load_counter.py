"""Where vLLM runs the model (engine core or worker): count expert load at the selection point, publish it.

    model pre-hook:   rows of this step = query_start_loc[R] (padding rows after them are never counted)
    _compute_routing: counts[layer, ids[:rows]] += 1; entropy_sum[layer] += sum H(softmax(logits[:rows]))
                      (recording/vllm_worker.py's wrapper: the point `--backend vllm` records from)
    publisher thread: every `interval` s copy the counters, keep the copies of the last `window` s, and write
                      counters and window gauges (metrics.py) to prometheus_client's multiprocess files;
                      optionally one load-table file per window of `window` s (trace/load_table.py),
                      rewritten at each publication while its window runs

The hot path is an index_add and an entropy per layer and step, on the device, with no host sync; the dummy
batches vLLM runs while starting (profiling, warm-up) have no request and count nothing.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moescope.recording.vllm_worker import find_routers, step_requests, wrap_routers
from moescope.serve import metrics


@dataclass(frozen=True)
class MonitorOptions:
    folder: str  # prometheus_client multiprocess folder /metrics reads
    window: float = 60.0  # seconds the window gauges cover
    interval: float = 1.0  # seconds between publications
    load_table: str | None = None  # folder for one load-table file per window, or None


@dataclass
class Snapshot:
    time: float
    counts: np.ndarray  # int64 [L, E]
    entropy_sum: np.ndarray  # float64 [L]
    tokens: np.ndarray  # int64 [L]


class LoadCounter:
    """Device-side accumulators fed by the routing wrapper; `snapshot()` copies them to the host."""

    def __init__(self, runner):
        self.runner = runner
        self.routers = find_routers(runner.model)  # {moe layer: router}
        if not self.routers:
            raise RuntimeError("moescope: this vLLM model has no fused-MoE router to count")
        self.n_experts = [int(r.global_num_experts) for r in self.routers.values()]
        self.top_k = [int(r.top_k) for r in self.routers.values()]
        L, E = len(self.routers), max(self.n_experts)
        device = next(runner.model.parameters()).device
        self.counts = torch.zeros(L, E, dtype=torch.int64, device=device)  # [L, E]
        self.entropy_sum = torch.zeros(L, dtype=torch.float64, device=device)  # [L]
        self.tokens = torch.zeros(L, dtype=torch.int64, device=device)  # [L]
        self.rows = 0  # real rows of the running step
        self.seen = [0] * L  # rows each layer has routed in this step (a layer may route a step in pieces)
        self.restore: list = []

    def install(self) -> None:
        self.restore += wrap_routers(self.routers, self._count)
        handle = self.runner.model.register_forward_pre_hook(self._new_step, with_kwargs=True)
        self.restore.append(handle.remove)

    def uninstall(self) -> None:
        while self.restore:
            self.restore.pop()()

    def _new_step(self, module, args, kwargs) -> None:
        _, starts = step_requests(self.runner)
        self.rows = int(starts[-1])
        self.seen = [0] * len(self.seen)

    def _count(self, layer: int, router_logits, weights, ids) -> None:
        start = self.seen[layer]
        self.seen[layer] += ids.shape[0]
        take = min(ids.shape[0], self.rows - start)
        if take <= 0:
            return
        ids, logits = ids[:take], router_logits[:take]  # [n, k], [n, E]
        flat = ids.reshape(-1).long()
        self.counts[layer].index_add_(0, flat, torch.ones_like(flat))  # fixed size: no host sync, unlike bincount
        self.entropy_sum[layer] += torch.special.entr(torch.softmax(logits.float(), dim=-1)).sum()
        self.tokens[layer] += take

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
        stamp = time.time()
        L, E = now.counts.shape
        for layer in range(L):
            labels = {"layer": str(layer)}
            self.files.counter(metrics.LAYER_TOKENS, labels, now.tokens[layer])
            self.files.counter(metrics.ENTROPY_SUM, labels, now.entropy_sum[layer])
            for expert in range(self.counter.n_experts[layer]):
                self.files.counter(metrics.EXPERT_TOKENS, {"layer": str(layer), "expert": str(expert)},
                                   now.counts[layer, expert])
        stats = metrics.window_stats(now.counts - base.counts, now.entropy_sum - base.entropy_sum,
                                     now.tokens - base.tokens)
        for name, values in stats.items():
            for layer in range(L):
                self.files.gauge(name, {"layer": str(layer)}, values[layer], stamp)
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
