"""A local Ray cluster for the module's tests: loopback only, 2 CPU slots, a small object store; started once."""

from __future__ import annotations

import os

import pytest

from moescope.distributed.cluster import LOOPBACK_ONLY_ENV

os.environ.setdefault(LOOPBACK_ONLY_ENV, "0")  # read when ray is imported: before any test module imports it


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'moescope[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False,
             configure_logging=False)
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")  # nothing listens beyond this machine
    yield ray
    ray.shutdown()
