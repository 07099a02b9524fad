"""Write metric samples into prometheus_client's multiprocess files, from the process that computes them.

vLLM runs the model in its engine-core process (or a worker process under it) and serves /metrics from its
API-server process. prometheus_client's multiprocess mode is made for that: each process writes its samples to
`<dir>/<kind>_<pid>.db` (a memory-mapped file of (key, value, timestamp) records,
`prometheus_client.mmap_dict.MmapedDict`) and the serving process's `MultiProcessCollector(registry, path=dir)`
merges every file at scrape time (counters summed over processes, `mostrecent` gauges: the latest write). This writer fills those files directly, so moescope's counters live where
the model runs without switching prometheus_client there into multiprocess mode for vLLM's own metrics.
"""

from __future__ import annotations

import os

from prometheus_client.mmap_dict import MmapedDict, mmap_key


class PrometheusFiles:
    """Counters (totals) and `mostrecent` gauges of this process, in `folder`'s multiprocess files."""

    def __init__(self, folder: str, help_texts: dict[str, str]):
        self.help = help_texts
        pid = os.getpid()
        self.counters = MmapedDict(os.path.join(folder, f"counter_{pid}.db"))
        self.gauges = MmapedDict(os.path.join(folder, f"gauge_mostrecent_{pid}.db"))

    def counter(self, metric: str, labels: dict[str, str], total: float) -> None:
        key = mmap_key(metric, metric + "_total", list(labels), list(labels.values()), self.help[metric])
        self.counters.write_value(key, float(total), 0.0)

    def gauge(self, metric: str, labels: dict[str, str], value: float, timestamp: float) -> None:
        key = mmap_key(metric, metric, list(labels), list(labels.values()), self.help[metric])
        self.gauges.write_value(key, float(value), timestamp)

    def close(self) -> None:
        self.counters.close()
        self.gauges.close()
