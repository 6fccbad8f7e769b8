"""One way into dask.distributed for every stage: a scheduler address, or a LocalCluster of processes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from pipeline.errors import UserError


@contextlib.contextmanager
def dask_client(address: str | None, workers: int) -> Iterator:
    """A Client on `address`, or on a LocalCluster of `workers` one-thread processes, closed on exit.

    Starting a LocalCluster sets OMP/MKL/OPENBLAS_NUM_THREADS=1 in *this* process's environment (dask's
    pre-spawn settings); the environment is restored so that later subprocesses are not silently
    single-threaded.
    """
    from dask.distributed import Client, LocalCluster

    saved = dict(os.environ)
    cluster = None
    try:
        if address:
            client = Client(address, timeout="20s")
        else:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
            client = Client(cluster)
    except (OSError, TimeoutError) as err:
        if cluster is not None:
            cluster.close()
        raise UserError(f"cannot reach the dask scheduler at --address {address} ({err}); start it "
                        "(`dask scheduler` + `dask worker`) or leave --address out to use a local cluster") from err
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
