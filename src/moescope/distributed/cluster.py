"""Connecting to a Ray cluster: an address, `auto`, or `local` (a cluster started in this process).

Ray is an optional extra; nothing outside `moescope.distributed` imports it, and the in-process paths
never do.
"""

from __future__ import annotations

from moescope.errors import MoescopeError


def require_ray():
    try:
        import ray
    except ImportError:
        raise MoescopeError("--ray needs Ray: pip install 'moescope[ray]' (or run scripts/setup.sh)") from None
    return ray


def connect(address: str | None):
    """The `ray` module, connected to the cluster at `address` (None or 'local': start one here)."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    try:
        if address in (None, "", "local"):
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MoescopeError(f"cannot connect to the Ray cluster at {address!r}: {first}") from None
    return ray
