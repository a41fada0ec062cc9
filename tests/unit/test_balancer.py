"""Routing among several servers: least-loaded choice, health, probes (`blocks/_balancer.py`).

No network: the backends' clients are never used, the probe is a function the test controls.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from prefect_roboflow.blocks._balancer import Backend, Balancer, Outcome, server_label
from prefect_roboflow.blocks._limiter import AdaptiveLimiter


def _backend(name: str, limit: int = 4) -> Backend:
    return Backend(f"http://{name}:9001", httpx.AsyncClient(), AdaptiveLimiter(64, initial=limit))


async def _never(_: Backend) -> bool:
    return False


@pytest.fixture()
async def three() -> AsyncIterator[tuple[Balancer, list[Backend]]]:
    backends = [_backend("a"), _backend("b"), _backend("c")]
    balancer = Balancer(backends, _never, probe_backoff=0.01, probe_max_backoff=0.02)
    yield balancer, backends
    await balancer.aclose()


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Yield to the loop until ``condition`` holds (the deadline only ends a broken test)."""
    deadline = asyncio.get_running_loop().time() + 30
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.005)


async def test_the_least_loaded_server_takes_the_request(three: tuple[Balancer, list[Backend]]) -> None:
    balancer, (a, b, c) = three
    b.limiter._set(8)  # b admits twice as many
    a.pending, b.pending, c.pending = 3, 4, 4  # loads 0.75, 0.5, 1.0
    assert balancer.choose() is b
    b.pending = 7  # 0.875
    assert balancer.choose() is a


async def test_equal_loads_take_turns(three: tuple[Balancer, list[Backend]]) -> None:
    balancer, backends = three
    chosen = []
    for _ in range(6):
        backend = balancer.choose()
        async with balancer.routed(backend):
            chosen.append(backend.label)
    assert chosen == ["http://a:9001", "http://b:9001", "http://c:9001"] * 2
    assert [b.pending for b in backends] == [0, 0, 0]


async def test_routed_requests_count_as_load_until_they_finish(three: tuple[Balancer, list[Backend]]) -> None:
    balancer, (a, b, c) = three
    async with balancer.routed(a), balancer.routed(b):
        assert balancer.choose() is c
        async with balancer.routed(c), balancer.routed(c):
            assert balancer.choose() in (a, b)
    assert balancer.choose() is a  # all idle again: a and b took fewest, a is listed first
    assert (a.routed, b.routed, c.routed) == (1, 1, 2)


async def test_a_retry_avoids_the_server_it_failed_on(three: tuple[Balancer, list[Backend]]) -> None:
    balancer, (a, b, c) = three
    b.pending = c.pending = 10
    assert balancer.choose() is a
    assert balancer.choose(avoid=a) in (b, c)


async def test_a_refused_connection_takes_a_server_out_at_once(three: tuple[Balancer, list[Backend]]) -> None:
    balancer, (a, b, c) = three
    balancer.report(a, Outcome.UNREACHABLE)
    assert not a.healthy and balancer.healthy == (b, c)
    b.pending = c.pending = 50
    assert balancer.choose() in (b, c)  # busier, but up
    assert balancer.has_alternative(a) and balancer.has_alternative(b)


async def test_repeated_unavailable_answers_take_a_server_out(three: tuple[Balancer, list[Backend]]) -> None:
    balancer, (a, _, _) = three
    balancer.report(a, Outcome.UNAVAILABLE)
    balancer.report(a, Outcome.UNAVAILABLE)
    balancer.report(a, Outcome.ANSWERED)  # an answer in between clears the strikes
    balancer.report(a, Outcome.UNAVAILABLE)
    balancer.report(a, Outcome.UNAVAILABLE)
    balancer.report(a, Outcome.NEUTRAL)  # says nothing either way
    assert a.healthy and a.strikes == 2
    balancer.report(a, Outcome.UNAVAILABLE)
    assert not a.healthy


async def test_with_every_server_down_requests_still_go_out(three: tuple[Balancer, list[Backend]]) -> None:
    balancer, backends = three
    for backend in backends:
        balancer.report(backend, Outcome.UNREACHABLE)
    assert balancer.healthy == ()
    a, b, _ = backends
    assert balancer.choose(avoid=a) is b  # least loaded of all, not the one that just failed
    assert not balancer.has_alternative(b)  # so the engine waits its backoff before the retry


async def test_a_server_taken_out_is_probed_back_in() -> None:
    probes: list[str] = []
    up = asyncio.Event()

    async def probe(backend: Backend) -> bool:
        probes.append(backend.label)
        return up.is_set()

    a, b = _backend("a"), _backend("b")
    balancer = Balancer([a, b], probe, probe_backoff=0.01, probe_max_backoff=0.04)
    try:
        balancer.report(a, Outcome.UNREACHABLE)
        await _until(lambda: len(probes) >= 3, "three failed probes")
        assert not a.healthy and balancer.choose() is b
        up.set()
        await _until(lambda: a.healthy, "a back in rotation")
        assert set(probes) == {"http://a:9001"} and a.strikes == 0
        b.pending = 1
        assert balancer.choose() is a
    finally:
        await balancer.aclose()


async def test_an_answer_brings_a_server_back_without_a_probe(three: tuple[Balancer, list[Backend]]) -> None:
    balancer, (a, _, _) = three
    balancer.report(a, Outcome.UNREACHABLE)
    balancer.report(a, Outcome.ANSWERED)  # e.g. a request sent while every server was down
    assert a.healthy


async def test_one_server_alone_is_never_taken_out_nor_probed() -> None:
    calls: list[Backend] = []

    async def probe(backend: Backend) -> bool:
        calls.append(backend)
        return False

    only = _backend("only")
    balancer = Balancer([only], probe, probe_backoff=0.01)
    try:
        for _ in range(5):
            balancer.report(only, Outcome.UNREACHABLE)
        assert only.healthy and only._probe is None and balancer.choose(avoid=only) is only
    finally:
        await balancer.aclose()
    assert calls == []


async def test_a_probe_that_raises_keeps_probing() -> None:
    attempts: list[int] = []

    async def flaky(_: Backend) -> bool:
        attempts.append(1)
        if len(attempts) < 3:
            raise RuntimeError("probe broke")
        return True

    a, b = _backend("a"), _backend("b")
    balancer = Balancer([a, b], flaky, probe_backoff=0.01, probe_max_backoff=0.02)
    try:
        balancer.report(a, Outcome.UNREACHABLE)
        await _until(lambda: a.healthy, "a back after two broken probes")
        assert len(attempts) == 3
    finally:
        await balancer.aclose()


def test_a_balancer_needs_a_server() -> None:
    probe: Callable[[Backend], Awaitable[bool]] = _never
    with pytest.raises(ValueError, match="at least one"):
        Balancer([], probe)


@pytest.mark.parametrize(
    ("url", "label"),
    [
        ("http://127.0.0.1:9002/", "http://127.0.0.1:9002"),
        ("https://user:secret@gpu.example:443/infer/", "https://gpu.example:443/infer"),
        ("http://[::1]:9001", "http://[::1]:9001"),
    ],
)
def test_a_server_label_never_shows_credentials(url: str, label: str) -> None:
    assert server_label(url) == label
