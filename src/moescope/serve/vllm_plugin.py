"""moescope's vLLM general plugin: live expert load on `vllm serve`'s Prometheus /metrics.

Installed with moescope (entry point `vllm.general_plugins: moescope = moescope.serve.vllm_plugin:register`) and
off unless the server starts with MOESCOPE_VLLM_METRICS=1: `register` then returns at once, importing and
patching nothing. Switched on:

    MOESCOPE_VLLM_METRICS=1          count; serve the metrics of serve/metrics.py on /metrics
    MOESCOPE_VLLM_WINDOW_S=60        seconds the sliding-window gauges cover (and each load-table window)
    MOESCOPE_VLLM_INTERVAL_S=1       seconds between updates of /metrics
    MOESCOPE_VLLM_LOAD_TABLE=DIR     also write one load-table file per window into DIR (trace/load_table.py):
                                     the per-expert detail, whatever the series below
    MOESCOPE_VLLM_EXPERT_SERIES=none per-expert series on /metrics: none (default: per-layer series only,
                                     8·L + 1), all (+ L·E counters), or N (+ the N busiest experts per layer)

vLLM loads general plugins in every process it starts. In the first (the API server) `register` makes the
folder the counters are written to and registers a prometheus_client `MultiProcessCollector` over it on the
default registry, which a single API server's /metrics serves; processes started later inherit the folder
through MOESCOPE_VLLM_METRICS_DIR. With several API servers vLLM itself sets PROMETHEUS_MULTIPROC_DIR and
serves every file in it; the counters are then written there (not tested here). In the process that loads the
model (the engine core, or each worker) `register` wraps the worker's `load_model`: once the model is loaded the
routers are counted (serve/load_counter.py), on the first tensor-parallel rank only (the ranks route the same
tokens); data-parallel engines each count their own tokens and /metrics sums them (neither tested here: no
GPUs).

The counters work in vLLM's default compiled mode as well as with --enforce-eager: what runs at the selection
point is tensor work on buffers made before compilation (serve/load_counter.py), so it is traced into the graph
and replayed at every step. A compiled graph cached on disk by a server started without the plugin has no
counting in it, so with the plugin on, vLLM's compile cache is switched off (VLLM_DISABLE_COMPILE_CACHE=1: each
start compiles the model); the plugin refuses, in one line, VLLM_USE_AOT_COMPILE=1 (a graph loaded from disk,
not traced with the counters), pipeline parallelism, and MoE kernels that select experts inside the kernel.
"""

from __future__ import annotations

import os

ENABLE = "MOESCOPE_VLLM_METRICS"
FOLDER = "MOESCOPE_VLLM_METRICS_DIR"
ATTR = "_moescope_load_monitor"


def register() -> None:
    """vLLM calls this in each of its processes; it does nothing unless MOESCOPE_VLLM_METRICS=1."""
    if os.environ.get(ENABLE) != "1":
        return
    options()  # a bad setting stops the server here, naming it
    if os.environ.get("VLLM_USE_AOT_COMPILE") == "1":
        raise RuntimeError("moescope: MOESCOPE_VLLM_METRICS=1 cannot count with VLLM_USE_AOT_COMPILE=1 (the compiled "
                           "graph is loaded from disk, without the counters); unset it")
    # every process vLLM starts from here inherits this; a cached graph may come from a server without counters
    os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"
    if FOLDER not in os.environ:
        _serve_folder()
    _count_after_load()


def options():
    from moescope.serve.load_counter import MonitorOptions
    from moescope.serve.metrics import ExpertSeries

    def seconds(name: str, default: float) -> float:
        text = os.environ.get(name, str(default))
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise RuntimeError(f"moescope: {name}={text!r} must be a positive number of seconds")
        return value

    try:
        series = ExpertSeries.parse(os.environ.get("MOESCOPE_VLLM_EXPERT_SERIES"))
    except ValueError as err:
        raise RuntimeError(f"moescope: {err}") from None
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get(FOLDER, "")
    return MonitorOptions(folder=folder, window=seconds("MOESCOPE_VLLM_WINDOW_S", 60.0),
                          interval=seconds("MOESCOPE_VLLM_INTERVAL_S", 1.0),
                          load_table=os.environ.get("MOESCOPE_VLLM_LOAD_TABLE") or None, expert_series=series)


def _serve_folder() -> None:
    """In the first process: a fresh folder for the counters, merged into this process's default registry."""
    import atexit
    import shutil
    import tempfile

    from prometheus_client import REGISTRY
    from prometheus_client.multiprocess import MultiProcessCollector

    folder = tempfile.mkdtemp(prefix="moescope-vllm-metrics-")
    os.environ[FOLDER] = folder  # inherited by the engine core and workers vLLM starts from here
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:  # with it set, vLLM's own collector serves the counters
        MultiProcessCollector(REGISTRY, path=folder)


def _count_after_load() -> None:
    """Wrap the vLLM worker's load_model (once per process) so that the model's routers get counted."""
    from vllm.v1.worker.gpu_worker import Worker

    if getattr(Worker.load_model, "_moescope", False):
        return
    original = Worker.load_model

    def load_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        start_monitor(self)

    load_model._moescope = True
    Worker.load_model = load_model


def start_monitor(worker) -> None:
    """Count `worker`'s model and publish on a background thread until the process exits."""
    import atexit

    from moescope.serve.load_counter import LoadCounter, Publisher

    from vllm.distributed import get_tensor_model_parallel_rank

    config = worker.vllm_config
    if config.parallel_config.pipeline_parallel_size > 1:
        raise RuntimeError("moescope: MOESCOPE_VLLM_METRICS=1 does not support pipeline parallelism")
    if get_tensor_model_parallel_rank() != 0:
        return  # tensor-parallel ranks route the same tokens: one of them counts
    opts = options()
    counter = LoadCounter.for_runner(worker.model_runner)
    counter.install()
    mode = "eager" if config.model_config.enforce_eager else f"compiled ({config.compilation_config.mode.name})"
    series = opts.expert_series
    print(f"moescope: counting the expert load of {len(counter.n_experts)} MoE layers in {mode} mode; "
          f"{series.count(len(counter.n_experts), max(counter.n_experts))} series on /metrics", flush=True)
    publisher = Publisher(counter, opts)
    publisher.start()
    atexit.register(publisher.close)
    setattr(worker, ATTR, publisher)
