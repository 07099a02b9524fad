"""The serving parts that need no vLLM: the plugin's switch, the window statistics, the multiprocess files
/metrics reads, and `moescope top` against endpoints that are not a plugin's."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from moescope.cli.main import main
from moescope.serve import metrics
from moescope.serve.prometheus_files import PrometheusFiles
from moescope.serve.server_process import free_port
from moescope.serve.top import parse_snapshot, render


def test_the_plugin_is_off_by_default_and_imports_nothing():
    code = ("import sys; from moescope.serve import vllm_plugin; vllm_plugin.register(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('moescope', 'vllm', 'torch', 'prometheus_client')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['moescope', 'moescope.serve', 'moescope.serve.vllm_plugin', 'moescope.version']"


@pytest.mark.parametrize("name, value", [("MOESCOPE_VLLM_WINDOW_S", "ten"), ("MOESCOPE_VLLM_INTERVAL_S", "0")])
def test_a_bad_setting_stops_the_server_naming_it(monkeypatch, name, value):
    from moescope.serve import vllm_plugin

    monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=f"moescope: {name}={value!r} must be a positive number of seconds"):
        vllm_plugin.options()


@pytest.mark.parametrize("tokens", [1, 7, 256])
def test_window_stats_against_a_plain_reference(tokens):
    rng = np.random.default_rng(tokens)
    L, E, k = 3, 8, 2
    ids = np.argsort(rng.random((L, tokens, E)), -1)[..., :k]
    load = np.stack([np.bincount(ids[l].ravel(), minlength=E) for l in range(L)])
    load[2] = 0  # a layer without tokens in the window
    entropy_sum, n = rng.random(L) * tokens, np.array([tokens, tokens, 0])
    stats = metrics.window_stats(load, entropy_sum, n)
    for l in range(2):
        c = load[l].tolist()
        assert stats[metrics.BALANCEDNESS][l] == pytest.approx(sum(c) / len(c) / max(c), rel=1e-12)
        p = [x / sum(c) for x in c if x]
        assert stats[metrics.LOAD_ENTROPY][l] == pytest.approx(-sum(x * np.log(x) for x in p) / np.log(E), rel=1e-12)
        assert stats[metrics.ROUTING_ENTROPY][l] == pytest.approx(entropy_sum[l] / tokens, rel=1e-12)
    assert all(np.isnan(stats[name][2]) for name in stats)


def test_multiprocess_files_reach_a_collector_in_another_process(tmp_path):
    """What the engine core writes is what the API server's MultiProcessCollector serves."""
    code = f"""
from moescope.serve.prometheus_files import PrometheusFiles
from moescope.serve import metrics
files = PrometheusFiles({str(tmp_path)!r}, metrics.HELP)
files.counter(metrics.EXPERT_TOKENS, {{"layer": "0", "expert": "3"}}, 41.0)
files.counter(metrics.EXPERT_TOKENS, {{"layer": "0", "expert": "3"}}, 42.0)  # totals, not increments
files.gauge(metrics.BALANCEDNESS, {{"layer": "0"}}, 0.5, 1.0)
files.gauge(metrics.BALANCEDNESS, {{"layer": "0"}}, 0.25, 2.0)
files.close()
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(generate_latest(registry).decode()) for s in family.samples}
    assert samples == {("moescope_expert_tokens_total", (("expert", "3"), ("layer", "0"))): 42.0,
                       ("moescope_balancedness", (("layer", "0"),)): 0.25}


def _metrics_page(L=2, E=4, k=2, counts=None, tokens=10) -> str:
    counts = np.arange(L * E).reshape(L, E) if counts is None else counts
    lines = []
    for l in range(L):
        lines.append(f'moescope_layer_info{{layer="{l}",n_experts="{E}",top_k="{k}"}} 1.0')
        lines.append(f'moescope_layer_tokens_total{{layer="{l}"}} {tokens}')
        lines.append(f'moescope_balancedness{{layer="{l}"}} 0.5')
        lines.append(f'moescope_load_entropy{{layer="{l}"}} 0.9')
        lines.append(f'moescope_routing_entropy{{layer="{l}"}} 1.2')
        lines += [f'moescope_expert_tokens_total{{layer="{l}",expert="{e}"}} {counts[l, e]}' for e in range(E)]
    return "\n".join(["# TYPE moescope_expert_tokens_total counter", *lines, "moescope_window_seconds 60.0", ""])


def test_top_frame_from_two_scrapes():
    first = parse_snapshot(_metrics_page(tokens=10), "u", 0.0)
    later = parse_snapshot(_metrics_page(counts=np.array([[0, 9, 2, 3], [4, 5, 6, 20]]), tokens=16), "u", 2.0)
    frame = render("http://h/metrics", later, first)
    assert "2 MoE layers x 4 experts, top-2   window 60 s   tokens routed 16   tokens/s 3.0" in frame
    rows = frame.splitlines()[-2:]
    assert rows[0].split()[6:] == ["e1", "100%", "e0", "0%", "e2", "0%"]  # what grew since the last scrape
    assert rows[1].split()[6:] == ["e3", "100%", "e0", "0%", "e1", "0%"]


class _Plain(BaseHTTPRequestHandler):
    body = b"not prometheus {{{"

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        return None


def test_top_on_a_metrics_endpoint_without_the_plugin_says_so_in_one_line(capsys):
    registry = CollectorRegistry()
    Counter("vllm:prompt_tokens", "vLLM's own metric", registry=registry).inc(5)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        assert main(["top", f"127.0.0.1:{port}", "--once", "--interval", "0.1"]) == 2
    finally:
        server.shutdown()
        thread.join()
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: http://127.0.0.1:{port}/metrics serves no moescope metrics: start the vLLM server with "
        "MOESCOPE_VLLM_METRICS=1 and moescope installed in its environment"]


def test_top_on_an_unreachable_or_foreign_address_is_one_line(capsys):
    port = free_port()
    assert main(["top", f"http://127.0.0.1:{port}", "--once"]) == 2
    assert capsys.readouterr().err.strip() == f"error: cannot reach http://127.0.0.1:{port}/metrics: [Errno 111] Connection refused"
    assert main(["top", "ftp://example.org/x", "--once"]) == 2
    assert capsys.readouterr().err.strip() == "error: ftp://example.org/x: not an http(s) address of a server"
    server = HTTPServer(("127.0.0.1", 0), _Plain)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert main(["top", f"127.0.0.1:{server.server_port}/stats", "--once"]) == 2
    finally:
        server.shutdown()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: http://127.0.0.1:{server.server_port}/stats: not Prometheus metrics text")


def test_top_help_ends_in_examples():
    result = subprocess.run([sys.executable, "-m", "moescope.cli.main", "top", "--help"], capture_output=True, text=True)
    assert "examples:" in result.stdout and "moescope top localhost:8000 --once" in result.stdout
    json.dumps(result.stdout)  # plain text


def test_the_plugin_side_imports_no_compiled_kernels():
    """vLLM's CPU platform scans every imported module's attributes when a worker starts, and llvmlite's ctypes
    wrappers break that scan: the modules the plugin loads inside vLLM must not import numba (and so llvmlite)."""
    import subprocess
    import sys

    code = ("import sys, moescope.serve.vllm_plugin, moescope.serve.load_counter, moescope.serve.metrics; "
            "print(sorted(m for m in ('numba', 'llvmlite') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class _Page(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(_metrics_page(tokens=10).encode())

    def log_message(self, *args):
        return None


def test_top_quits_on_ctrl_c_even_when_started_with_sigint_ignored():
    """A shell's background job, nohup or a CI runner can hand `moescope top` SIGINT ignored: Ctrl-C still quits it."""
    import signal

    server = HTTPServer(("127.0.0.1", 0), _Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    top = subprocess.Popen([sys.executable, "-m", "moescope.cli.main", "top", f"127.0.0.1:{server.server_port}",
                            "--interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert "moescope top" in top.stdout.readline() + top.stdout.readline()  # the first frame is drawn
        top.send_signal(signal.SIGINT)
        assert top.wait(timeout=20) == 0, top.stderr.read()
    finally:
        top.kill()
        server.shutdown()


def test_top_loads_no_storage_layer_without_storage_options():
    """pyarrow's filesystems register an S3 finalizer that runs at exit; `moescope top` never touches storage."""
    code = ("import sys; from moescope.cli.main import main; main(['top', 'http://127.0.0.1:9', '--once']); "
            "print('pyarrow.fs' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.strip() == "False"
