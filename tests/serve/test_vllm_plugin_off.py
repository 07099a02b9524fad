"""A real `vllm serve` without moescope's plugin, and one the plugin refuses (VLLM_USE_AOT_COMPILE=1); slow: two starts."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import pytest

from serve_helpers import start_server

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_without_the_plugin_metrics_have_no_moescope_lines_and_top_says_so(tmp_path):
    server = start_server(tmp_path / "server.log", plugin=False)
    try:
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
            page = response.read().decode()
        assert "vllm:" in page and "moescope_" not in page
        result = subprocess.run([sys.executable, "-m", "moescope.cli.main", "top", server.url, "--once",
                                 "--interval", "0.2"], capture_output=True, text=True, timeout=60)
    finally:
        assert server.stop() == 0
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {server.url}/metrics serves no moescope metrics: start the vLLM server with MOESCOPE_VLLM_METRICS=1 "
        "and moescope installed in its environment"]


def test_the_plugin_refuses_a_graph_loaded_from_disk_in_one_line(tmp_path):
    """VLLM_USE_AOT_COMPILE=1 loads a compiled graph from disk, which may have been traced without the counters."""
    server = start_server(tmp_path / "server.log", plugin=True, eager=False, wait=False,
                          env={"VLLM_USE_AOT_COMPILE": "1"})
    try:
        returncode = server.process.wait(timeout=900)
    finally:
        server.stop()
    assert returncode != 0
    log = (tmp_path / "server.log").read_text()
    assert "RuntimeError: moescope: MOESCOPE_VLLM_METRICS=1 cannot count with VLLM_USE_AOT_COMPILE=1 (the compiled " \
           "graph is loaded from disk, without the counters); unset it" in log.splitlines()
