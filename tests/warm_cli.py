"""Run `moescope` commands as separate processes that a test can SIGKILL, without paying the imports each time.

A kill test needs the real command line in its own process, many times over; starting Python, torch and
transformers costs ~10 s per process here. `WarmCli` starts one helper interpreter (this file run as a
script) that imports them once and then forks a child per command: the child runs
`moescope.cli.main.main(argv)` — the console script's own entry point — and exits with its return code.
The helper never runs a torch operation itself and uses one thread, so forking it is safe.

    with WarmCli() as cli:
        run = cli.start(["capture", model, "--data", corpus, "--out", out])
        ...                      # poll the output folder, then
        run.kill()               # SIGKILL
        assert run.wait() == -9
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


class Run:
    """One forked command: its pid, and its exit status once `wait`ed (negative: killed by that signal)."""

    def __init__(self, cli: "WarmCli", pid: int, log: Path):
        self.cli, self.pid, self.log = cli, pid, log
        self.status: int | None = None

    def finished(self, timeout: float = 0.0) -> bool:
        """True once the command has ended (waits up to `timeout` seconds for it)."""
        if self.status is None and select.select([self.cli.proc.stdout], [], [], timeout)[0]:
            self.status = self.cli._read()["status"]
        return self.status is not None

    def kill(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:  # ended (and was reaped) just before the kill
                pass

    def wait(self, timeout: float = 300.0) -> int:
        if not self.finished(timeout):
            self.kill()
            raise TimeoutError(f"moescope {self.pid} did not finish in {timeout} s; log: {self.log.read_text()[-2000:]}")
        return self.status


class WarmCli:
    """The helper interpreter; one command at a time."""

    def __init__(self, *, cwd: str | os.PathLike | None = None, log_dir: str | os.PathLike | None = None):
        self.log_dir = Path(log_dir or cwd or ".")
        env = {**os.environ, **ENV}
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=cwd, env=env, text=True)
        self.ready = False  # read on first use: the imports overlap with whatever the caller does meanwhile
        self.n = 0

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the warm moescope helper died (exit {self.proc.wait()})")
        return json.loads(line)

    def start(self, argv: list[str]) -> Run:
        if not self.ready:
            ready = self._read()
            assert ready == {"ready": True}, ready
            self.ready = True
        self.n += 1
        log = self.log_dir / f"moescope-run-{self.n}.log"
        self.proc.stdin.write(json.dumps({"argv": [str(a) for a in argv], "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        return Run(self, self._read()["pid"], log)

    def run(self, argv: list[str], timeout: float = 300.0) -> tuple[int, str]:
        """Run to the end; (exit status, what it printed)."""
        run = self.start(argv)
        return run.wait(timeout), run.log.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)

    def __enter__(self) -> "WarmCli":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_until(condition, run: Run, *, timeout: float = 120.0, poll: float = 0.003) -> bool:
    """Poll `condition()` until it holds (True) or `run` ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if run.finished(poll):
            return False
    raise TimeoutError("condition not reached")


def _serve() -> None:
    """The helper: import once, then fork one child per request line on stdin."""
    import torch  # noqa: F401  (the imports are the point: children inherit them)
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import moescope.api  # noqa: F401
    import moescope.models  # noqa: F401
    import moescope.pipeline.quant  # noqa: F401
    import moescope.quant.sweep  # noqa: F401
    from moescope.cli.main import main

    torch.set_num_threads(1)
    out = sys.stdout
    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # child: becomes the command, never returns into this loop
            code = 1
            try:
                fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1), os.dup2(fd, 2)
                sys.stdin.close()
                code = main(request["argv"])
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), file=out, flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"status": code}), file=out, flush=True)


if __name__ == "__main__":
    _serve()
