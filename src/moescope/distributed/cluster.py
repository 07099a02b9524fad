"""Connecting to a Ray cluster: an address, `auto`, or `local` (a cluster started in this process).

Ray is an optional extra; nothing outside `moescope.distributed` imports it, and the in-process paths
never do. A local cluster listens on the loopback interface only. An address is probed before Ray is
asked to join it, because Ray waits minutes for a cluster that is not there.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys

from moescope.errors import MoescopeError

# "0": Ray puts a cluster it starts on 127.0.0.1, not on the machine's network address; read when ray is imported
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
PROBE_SECONDS = 5.0


def require_ray() -> None:
    """Raise a one-line MoescopeError when Ray is not installed (without importing it)."""
    if importlib.util.find_spec("ray") is None:
        raise MoescopeError("--ray needs Ray: pip install 'moescope[ray]' (or run scripts/setup.sh)")


def _host_port(address: str) -> tuple[str, int]:
    """('host', port) of 'host:port' or 'ray://host:port'; a one-line error for anything else."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MoescopeError(f"--ray {address}: not a Ray address; give HOST:PORT, ray://HOST:PORT, auto, "
                            "or nothing (start a cluster on this machine)")
    return host.strip("[]"), int(port)


def _probe(address: str) -> None:
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
    except OSError as err:
        raise MoescopeError(f"cannot connect to the Ray cluster at {address}: nothing answers there "
                            f"({err.strerror or err}); start one with `ray start --head` or check the address") from None


def connect(address: str | None):
    """The `ray` module, connected to the cluster at `address` (None or 'local': start one here)."""
    require_ray()
    local = address in (None, "", "local")
    if local and "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ONLY_ENV, "0")
    import ray

    if ray.is_initialized():
        return ray
    if not local and address != "auto":
        _probe(address)
    try:
        if local:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MoescopeError(f"cannot connect to the Ray cluster at {address!r}: {first}") from None
    return ray
