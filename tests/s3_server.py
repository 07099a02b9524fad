"""A real S3 server on loopback for the tests: moto in server mode (`moto[server]`, a dev dependency), started
in a child process on a free port of 127.0.0.1 and stopped at the end. Buckets are made with pyarrow itself."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

# credentials moto accepts (any); set for the moescope code under test through the ordinary AWS variables
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "moescope-test", "AWS_SECRET_ACCESS_KEY": "moescope-test", "AWS_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    process: subprocess.Popen

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach this server through the AWS variables alone."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def new_bucket(self, prefix: str = "moescope") -> str:
        import pyarrow.fs as pafs

        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        host = self.endpoint.removeprefix("http://")
        pafs.S3FileSystem(endpoint_override=host, scheme="http", access_key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          secret_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region="us-east-1",
                          allow_bucket_creation=True).create_dir(name)
        return name

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server(timeout: float = 30.0) -> S3Server:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return S3Server(f"http://127.0.0.1:{port}", process)
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"moto_server did not listen on 127.0.0.1:{port} within {timeout:.0f} s") from None
            time.sleep(0.1)
