"""The e2e tests' own Prefect API client retries what Prefect's clients retry, and nothing else."""

from __future__ import annotations

import httpx
from _e2e import RetryingTransport
from support.fault_proxy import Fault, FaultProxy


def _client(proxy: FaultProxy) -> httpx.Client:
    return httpx.Client(base_url=proxy.url, transport=RetryingTransport(attempts=4, backoff=0.01), timeout=30)


def test_a_locked_database_answer_is_retried_until_it_clears(proxy: FaultProxy) -> None:
    proxy.inject(Fault.status(503), Fault.status(429, headers={"Retry-After": "0"}), path_prefix="/info")
    with _client(proxy) as client:
        assert client.get("/info").status_code == 200
    assert proxy.count("/info") == 3


def test_retries_are_bounded_and_other_errors_are_not_retried(proxy: FaultProxy) -> None:
    proxy.inject(*[Fault.status(503)] * 5, path_prefix="/info")
    with _client(proxy) as client:
        assert client.get("/info").status_code == 503
        assert proxy.count("/info") == 4
        proxy.clear()
        proxy.inject(Fault.status(500), path_prefix="/info")
        assert client.get("/info").status_code == 500
    assert proxy.count("/info") == 1
