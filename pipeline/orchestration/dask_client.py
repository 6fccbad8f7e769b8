"""One way into dask.distributed for every stage: a scheduler address, or a LocalCluster of processes.

A dask scheduler runs whatever its clients send on every worker, so who may connect matters. `tls://`
addresses use mutual TLS: certificates from `--tls-ca-file/--tls-cert/--tls-key` or from dask's own config
(`distributed.comm.tls.*`), and a peer without a certificate signed by the CA is refused. A plain `tcp://`
address to another host is allowed (a private network may be all a user has) but warned about. A LocalCluster
listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

from pipeline.errors import UserError
from pipeline.log import LOGGER_NAME, log

LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}
TLS_KEYS = {"ca_file": "distributed.comm.tls.ca-file", "cert": "distributed.comm.tls.client.cert",
            "key": "distributed.comm.tls.client.key"}


def set_tls_files(ca_file: str | None, cert: str | None, key: str | None) -> None:
    """Command-line certificate files into dask's config, where `Security()` reads them (the dask CLI's way)."""
    import dask

    given = {"ca_file": ca_file, "cert": cert, "key": key}
    for name, path in given.items():
        if path and not os.path.isfile(path):
            raise UserError(f"--tls-{name.replace('_', '-')} {path}: no such file")
    if any(given.values()):
        dask.config.set({TLS_KEYS[name]: path for name, path in given.items() if path})


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


def client_security(address: str):
    """The Security for `address`: mutual TLS for tls://, none for tcp:// (warned about off this machine)."""
    from distributed.security import Security

    scheme, host = urlsplit(address).scheme, urlsplit(address).hostname or ""
    if scheme == "tls":
        security = Security(require_encryption=True)  # reads distributed.comm.tls.* (set from the options too)
        missing = [f"--tls-{name.replace('_', '-')}" for name, attr in
                   (("ca_file", "tls_ca_file"), ("cert", "tls_client_cert"), ("key", "tls_client_key"))
                   if not getattr(security, attr)]
        if missing:
            raise UserError(f"--address {address} is TLS but {', '.join(missing)} not given (nor set in dask's "
                            "config distributed.comm.tls.*): pass the CA file and this client's certificate and key")
        return security
    if scheme in ("tcp", "") and not is_loopback(host):
        log.warning(f"WARNING: --address {address} is plain, unauthenticated TCP: anyone who can reach that "
                    "scheduler can run code on every worker and read the data sent to it. Use a tls:// address "
                    "with certificates (README: 'Running on a shared cluster').")
    return None


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
            security = client_security(address)
            client = Client(address, timeout="20s", security=security)
        else:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                   dashboard_address=None)
            client = Client(cluster)
    except (OSError, TimeoutError) as err:
        if cluster is not None:
            cluster.close()
        raise UserError(f"cannot reach the dask scheduler at --address {address} ({err}); start it "
                        "(`dask scheduler` + `dask worker`), check its TLS certificates, or leave --address out "
                        "to use a local cluster") from err
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        client.forward_logging(LOGGER_NAME, level=logging.INFO)  # workers' hp-pipe lines reach this console
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
