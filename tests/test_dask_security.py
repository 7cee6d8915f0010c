"""The Dask backend over TLS: ``security=`` reaches the LocalCluster a runner starts and
the client it makes, and a TLS scheduler reached without it fails clearly.

The certificates are ``distributed.Security.temporary()``'s (a throwaway CA, made with
``cryptography``). Tests on a scheduler of the user's share one TLS LocalCluster
(fixture ``tls_cluster``: one worker process of one thread).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psutil
import pytest

import actionpool as ap
from tests import helpers as h
from tests.conftest import leftover_children

distributed = pytest.importorskip("distributed")
pytest.importorskip(
    "cryptography", reason="distributed.Security.temporary() makes its certificates with it"
)
pytestmark = pytest.mark.slow

CONNECT_TIMEOUT = "3s"

# The worker processes of the module's TLS cluster, while it is open: they belong to
# the fixture tls_cluster, not to the test that first asked for it.
_TLS_WORKERS: set[int] = set()


@dataclass(frozen=True)
class TLSCluster:
    address: str  # "tls://127.0.0.1:PORT"
    security: Any  # the distributed.Security its scheduler and workers use


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """conftest's check of the same name, overridden here: the TLS cluster's worker
    processes may outlive a test (conftest's per-module check sees them gone once the
    fixture closes the cluster), anything they started (a runner's worker-local pool)
    may not."""
    yield
    alive = leftover_children(allowed=set(_TLS_WORKERS))
    if alive:
        desc = []
        for p in alive:
            try:
                desc.append(f"{p.pid}: {' '.join(p.cmdline())[:120]}")
            except psutil.Error:
                desc.append(str(p.pid))
            with contextlib.suppress(psutil.Error):
                p.kill()
        pytest.fail("test left child processes running:\n" + "\n".join(desc))


@pytest.fixture(scope="module")
def tls_cluster() -> Iterator[TLSCluster]:
    """A LocalCluster on tls://127.0.0.1 (one worker process, one thread), for the
    module."""
    from actionpool.pools.dask import _BLAS_VARS

    security = distributed.Security.temporary()
    before = {var: os.environ.get(var) for var in _BLAS_VARS}
    cluster = distributed.LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        security=security,
    )
    try:
        for var, value in before.items():  # LocalCluster sets them to 1 in this process
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        with distributed.Client(cluster, security=security) as client:
            _TLS_WORKERS.update(int(pid) for pid in client.run(os.getpid).values())
        address = str(cluster.scheduler_address)
        assert address.startswith("tls://127.0.0.1:")
        yield TLSCluster(address, security)
    finally:
        _TLS_WORKERS.clear()
        cluster.close()


def square_plan(x: int) -> ap.Plan:
    plan = ap.Plan()
    plan.add(h.square, x, name="sq")
    return plan


def assert_ran_over_tls(report: ap.Report, value: int) -> None:
    out = report.outcome("sq")
    assert out.status is ap.Status.SUCCEEDED and out.value == value
    assert out.pool == "dask"
    assert isinstance(out.worker, str) and out.worker.startswith("tls://127.0.0.1:")


def test_a_runner_starts_its_own_local_cluster_over_tls() -> None:
    with ap.Runner(backend="dask", security=distributed.Security.temporary(), cpu_workers=1) as r:
        assert r.sizing.backend == "dask" and r.sizing.cluster_workers == 1
        assert "a LocalCluster started for this runner at tls://127.0.0.1:" in r.sizing.reason
        assert r.submit(h.square, 7).result(timeout=60) == 49
        assert_ran_over_tls(r.run(square_plan(3)), 9)


def test_a_tls_scheduler_without_security_fails_with_an_oserror_naming_it(
    tls_cluster: TLSCluster,
) -> None:
    import dask

    t0 = time.monotonic()
    with (
        dask.config.set({"distributed.comm.timeouts.connect": CONNECT_TIMEOUT}),
        pytest.raises(
            OSError,
            match=f"Dask scheduler at '{re.escape(tls_cluster.address)}' is reached over TLS:"
            " give security=",
        ),
    ):
        ap.Runner(backend="dask", address=tls_cluster.address)
    assert time.monotonic() - t0 < 10


def test_a_tls_scheduler_with_other_certificates_fails_with_an_oserror_naming_it(
    tls_cluster: TLSCluster,
) -> None:
    import dask

    t0 = time.monotonic()
    with (
        dask.config.set({"distributed.comm.timeouts.connect": CONNECT_TIMEOUT}),
        pytest.raises(
            OSError,
            match=f"Dask scheduler at '{re.escape(tls_cluster.address)}'.*TLS certificate",
        ),
    ):
        # another throwaway CA: neither side trusts the other's certificate
        ap.Runner(
            backend="dask",
            address=tls_cluster.address,
            security=distributed.Security.temporary(),
        )
    assert time.monotonic() - t0 < 10


def test_a_tls_scheduler_with_its_security_runs_a_node(tls_cluster: TLSCluster) -> None:
    with ap.Runner(backend="dask", address=tls_cluster.address, security=tls_cluster.security) as r:
        assert f"the cluster at {tls_cluster.address}" in r.sizing.reason
        assert r.sizing.cluster_workers == 1
        assert_ran_over_tls(r.run(square_plan(5)), 25)
