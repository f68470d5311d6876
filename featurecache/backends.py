"""Where the layer x head jobs run: joblib on loky (local processes), a Dask cluster or a Ray cluster.

The backend never changes the results: every job is a pure function of its inputs and its fixed thread count.
Dask and ray are optional extras (``featurecache[dask]``, ``featurecache[ray]``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from featurecache.errors import FeaturecacheError

log = logging.getLogger(__name__)

BACKENDS = ("loky", "dask", "ray")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise FeaturecacheError(f"unknown --backend {backend!r}; choose one of: {', '.join(BACKENDS)}")


@contextlib.contextmanager
def joblib_backend(backend: str, *, n_jobs: int, address: str | None = None) -> Iterator[None]:
    """Run the enclosed joblib calls on loky (local processes), a Dask cluster or a Ray cluster.

    Dask: ``address`` is a scheduler (``tcp://host:8786``); without one, ``$DASK_SCHEDULER_ADDRESS`` or else a
    local cluster of ``n_jobs`` single-threaded worker processes. Ray: ``address`` or ``$RAY_ADDRESS``, else a
    local Ray. Cluster workers read the caches and write the models by path, so they need the same filesystem.
    """
    from joblib import parallel_config

    check_backend(backend)
    if backend == "dask":
        with _dask(n_jobs=n_jobs, address=address), parallel_config(backend="dask"):
            yield
    elif backend == "ray":
        with _ray(address=address), parallel_config(backend="ray"):
            yield
    else:
        with parallel_config(backend="loky"):
            yield


@contextlib.contextmanager
def _dask(*, n_jobs: int, address: str | None) -> Iterator[None]:
    """A Dask client on ``address`` (or the env's scheduler, or a local cluster started and closed here)."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise FeaturecacheError("--backend dask needs dask.distributed: pip install 'featurecache[dask]'") from None
    address = address or os.environ.get("DASK_SCHEDULER_ADDRESS")
    cluster = None
    if address is None:
        workers = n_jobs if n_jobs > 0 else os.cpu_count() or 1
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(address or cluster)
    log.info("dask backend: %s", client)
    try:
        yield
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


@contextlib.contextmanager
def _ray(*, address: str | None) -> Iterator[None]:
    """Ray registered as a joblib backend; a Ray started here (none was running) is shut down after."""
    try:
        import ray
        from ray.util.joblib import register_ray
    except ImportError:
        raise FeaturecacheError("--backend ray needs ray: pip install 'featurecache[ray]'") from None
    register_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address)  # None: $RAY_ADDRESS if set, else a local Ray
    try:
        yield
    finally:
        if started:
            ray.shutdown()
