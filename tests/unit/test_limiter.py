"""The adaptive concurrency limiter on simulated servers: a made-up clock, no sleeping.

`simulate` plays a client with an endless backlog against a server model: a link adding
``latency`` each way, ``workers`` that serve one request each in ``service`` seconds (FIFO),
optionally a front that answers 429 beyond ``admit`` requests in service, and optionally ``noise``:
a delay on every answer that the load does not cause (a shared machine's scheduling, a proxy),
exponential with that mean, from a seeded generator. Every answer is an event on a heap; the
clock jumps from one to the next.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import random
import statistics
from dataclasses import dataclass, field

import pytest

from prefect_roboflow.blocks._limiter import AdaptiveLimiter, Signal, Slot


@dataclass
class Clock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Server:
    """A server behind a link; its state advances as requests are sent in time order."""

    workers: int = 1_000_000
    service: float = 0.01
    latency: float = 0.0  # each way
    admit: int | None = None  # answer 429 beyond this many in service
    noise: float = 0.0  # mean of an exponential delay on every answer, whatever the load
    seed: int = 0
    free_at: list[float] = field(default_factory=list)
    in_service: list[float] = field(default_factory=list)  # finish times of admitted requests
    rejected: int = 0
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def answer(self, sent: float) -> tuple[float, Signal]:
        """When the answer to a request sent at ``sent`` reaches the client, and what it is."""
        arrives = sent + self.latency
        self.in_service = [t for t in self.in_service if t > arrives]
        if self.admit is not None and len(self.in_service) >= self.admit:
            self.rejected += 1
            return arrives + self.latency, Signal.OVERLOAD
        start = arrives if len(self.free_at) < self.workers else max(arrives, heapq.heappop(self.free_at))
        done = start + self.service
        heapq.heappush(self.free_at, done)
        self.in_service.append(done)
        return done + self.latency + (self.rng.expovariate(1 / self.noise) if self.noise else 0.0), Signal.OK


@dataclass
class Trace:
    limits: list[int]  # the limit after each answer
    rejected: int
    seconds: float

    @property
    def final(self) -> int:
        return self.limits[-1]


def simulate(limiter: AdaptiveLimiter, clock: Clock, server: Server, answers: int) -> Trace:
    """Keep the limiter full for ``answers`` answers (overloads are retried, as the engine does)."""

    async def run() -> Trace:
        pending: list[tuple[float, int, Slot, Signal]] = []
        limits: list[int] = []
        sequence = 0
        while len(limits) < answers:
            while limiter.in_flight < limiter.limit:
                slot = await limiter.acquire("/clip/embed_image")
                at, outcome = server.answer(clock.now)
                sequence += 1
                heapq.heappush(pending, (at, sequence, slot, outcome))
            at, _, slot, outcome = heapq.heappop(pending)
            clock.now = at
            slot.signal = outcome
            limiter.release(slot)
            limits.append(limiter.limit)
        seconds = clock.now
        while pending:  # the backlog ends: answers still under way come in
            at, _, slot, outcome = heapq.heappop(pending)
            clock.now, slot.signal = at, outcome
            limiter.release(slot)
        return Trace(limits, server.rejected, seconds)

    return asyncio.run(run())


def make(cap: int = 64, **options: float) -> tuple[AdaptiveLimiter, Clock]:
    clock = Clock()
    return AdaptiveLimiter(cap, clock=clock, **options), clock  # type: ignore[arg-type]


# --- growth while latency holds ---------------------------------------------------------------


def test_starts_modestly_and_doubles_while_latency_holds() -> None:
    limiter, clock = make(cap=64)
    assert limiter.limit == 4
    trace = simulate(limiter, clock, Server(service=0.01, latency=0.025), answers=4 + 8 + 16)
    # Slow start: one round of `limit` answers at each size, then double.
    assert trace.limits[3] == 8 and trace.limits[11] == 16 and trace.final == 32


def test_grows_to_the_cap_across_a_link_and_never_past_it() -> None:
    limiter, clock = make(cap=24)
    trace = simulate(limiter, clock, Server(service=0.01, latency=0.05), answers=300)
    assert max(trace.limits) == 24 and trace.final == 24 and limiter.peak == 24


def test_a_caller_that_never_fills_the_limit_does_not_grow_it() -> None:
    limiter, clock = make()

    async def three_at_a_time() -> None:
        for _ in range(50):
            slots = [await limiter.acquire("k") for _ in range(3)]
            clock.now += 0.01
            for slot in slots:
                slot.signal = Signal.OK
                limiter.release(slot)

    asyncio.run(three_at_a_time())
    assert limiter.limit == 4


# --- backing off on rising latency -------------------------------------------------------------


@pytest.mark.parametrize(("workers", "latency"), [(1, 0.0), (2, 0.0), (2, 0.05), (8, 0.05)])
def test_settles_near_what_the_server_holds_plus_a_small_queue(workers: int, latency: float) -> None:
    service = 0.02
    limiter, clock = make(cap=64)
    trace = simulate(limiter, clock, Server(workers=workers, service=service, latency=latency), answers=2000)
    holds = workers * (service + 2 * latency) / service  # bandwidth-delay product, in requests
    settled = trace.limits[1000:]
    assert holds - 1 <= min(settled) and max(settled) <= holds + limiter.beta + 1
    # ... so the server is kept busy (the ramp-up included)
    assert 2000 / trace.seconds >= 0.9 * workers / service


@pytest.mark.parametrize(("latency", "noise"), [(0.05, 0.1), (0.05, 0.02), (0.0, 0.05)])
def test_latency_noise_the_load_does_not_cause_is_not_read_as_a_queue(latency: float, noise: float) -> None:
    """On a loaded machine or through a proxy every answer carries noise; judged against the
    fastest answer (the one that met none), every round looked queued and the limit held at half
    of what kept the server busy (0.5x the best fixed limit's throughput at 100 ms of noise)."""
    ratios = []
    for seed in range(6):  # seeded: the same answers every time; a mean over them, as promised
        server = {"workers": 2, "service": 0.02, "latency": latency, "noise": noise, "seed": seed}
        best = 0.0  # the oracle: the same server at each fixed limit
        for limit in (2, 4, 8, 12, 16, 24, 32, 48, 64):
            pinned, clock = make(cap=limit, floor=limit)
            best = max(best, 3000 / simulate(pinned, clock, Server(**server), answers=3000).seconds)  # type: ignore[arg-type]
        limiter, clock = make(cap=64)
        ratios.append(3000 / simulate(limiter, clock, Server(**server), answers=3000).seconds / best)  # type: ignore[arg-type]
    assert statistics.fmean(ratios) >= 0.85 and min(ratios) >= 0.75, ratios


def test_a_slower_server_brings_the_limit_down_but_not_below_beta() -> None:
    limiter, clock = make(cap=64)
    server = Server(workers=4, service=0.01, latency=0.05)
    simulate(limiter, clock, server, answers=1000)
    before = limiter.limit
    server.service = 0.2  # 20x slower: the link no longer matters, the server queues
    trace = simulate(limiter, clock, server, answers=300)
    assert before >= 40 and limiter.limit < before / 2
    assert min(trace.limits) >= limiter.beta


def test_latencies_are_compared_per_kind_of_request() -> None:
    # Heavy requests 30x slower than light ones, none queueing: not read as a rising latency.
    limiter, clock = make(cap=64)
    for _ in range(40):
        slots = _acquire(limiter, limiter.limit)
        start = clock.now
        for i, slot in enumerate(slots):
            slot.key = "heavy" if i % 2 else "light"
        for latency, kind in ((0.001, "light"), (0.03, "heavy")):
            clock.now = start + latency
            for slot in (s for s in slots if s.key == kind):
                slot.signal = Signal.OK
                limiter.release(slot)
    assert limiter.limit == 64


# --- overload: 429, 503, timeouts ---------------------------------------------------------------


@pytest.mark.parametrize("admit", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("latency", [0.0, 0.025])
def test_settles_at_or_below_a_server_concurrency_limit_with_few_429s(admit: int, latency: float) -> None:
    limiter, clock = make(cap=64)
    server = Server(workers=admit, service=0.01, latency=latency, admit=admit)
    trace = simulate(limiter, clock, server, answers=40)
    good = len(trace.limits) - trace.rejected
    assert trace.rejected <= rejection_bound(admit, good)
    assert statistics.median(trace.limits) <= admit and trace.final <= admit + 1  # k + 1 only while probing


def test_429s_grow_only_logarithmically_over_a_long_run() -> None:
    limiter, clock = make(cap=64)
    server = Server(workers=2, service=0.01, latency=0.025, admit=2)
    trace = simulate(limiter, clock, server, answers=2000)
    assert trace.rejected <= rejection_bound(2, 2000) <= 11
    assert sum(limit > 2 for limit in trace.limits) <= trace.rejected  # each probe ends at its 429


def rejection_bound(admit: int, good: int, initial: int = 4, probe_gap: int = 16) -> int:
    """The most 429s a server admitting ``admit`` at a time sends while the limiter gets ``good`` answers.

    A 429 needs more than ``admit`` in flight, and within one epoch (between two decreases) at
    most ``limit - admit`` requests can be over. Slow start reaches ``top``, the first
    ``initial * 2**i`` above ``admit``: ``top - admit`` 429s, then one halving per epoch while
    the limit is still above ``admit``. After that the limit grows by one: one excursion to
    ``admit + 1`` below the first ceiling, then probes, the j-th after ``probe_gap * 2**j`` good
    answers (the gap stops doubling after 2**5), each ending at its one 429.
    """
    top = initial
    while top <= admit:
        top *= 2
    bound, limit = top - admit, top
    while (limit := min(limit - 1, math.ceil(limit / 2))) > admit:
        bound += limit - admit
    bound += 1
    waited, j = 0, 0
    while waited + (probe_gap << min(j, 5)) <= good:
        waited += probe_gap << min(j, 5)
        bound, j = bound + 1, j + 1
    return bound


def test_one_decrease_per_round_trip() -> None:
    limiter, _ = make(cap=64, initial=16)
    slots = _acquire(limiter, 16)
    for slot in slots[:8]:  # eight 503s to requests sent together: one decrease
        slot.signal = Signal.OVERLOAD
        limiter.release(slot)
    assert limiter.limit == 8 and limiter.overloads == 8 and limiter.in_flight == 8
    for slot in slots[8:]:
        slot.signal = Signal.OK
        limiter.release(slot)
    late = _acquire(limiter, 1)[0]  # sent after the decrease: its overload counts
    late.signal = Signal.OVERLOAD
    limiter.release(late)
    assert limiter.limit == 4


def test_never_below_the_floor_when_everything_fails() -> None:
    limiter, _ = make(cap=64, floor=2)
    for _ in range(20):
        slot = _acquire(limiter, 1)[0]
        slot.signal = Signal.OVERLOAD
        limiter.release(slot)
    assert limiter.limit == 2


def test_ignored_signals_change_nothing() -> None:
    limiter, clock = make(cap=64)
    for _ in range(50):
        slot = _acquire(limiter, 1)[0]
        clock.now += 5.0 if _ % 2 else 0.0  # a fast 400 and a slow reset say nothing
        limiter.release(slot)  # signal defaults to IGNORE
    assert limiter.limit == 4 and limiter.in_flight == 0


def test_floor_equal_to_cap_is_a_fixed_limit() -> None:
    limiter, clock = make(cap=8, floor=8)
    trace = simulate(limiter, clock, Server(workers=1, service=0.01, admit=1), answers=100)
    assert set(trace.limits) == {8}


@pytest.mark.parametrize(("cap", "floor", "alpha", "beta"), [(0, 1, 3, 6), (4, 5, 3, 6), (8, 1, 6, 3)])
def test_rejects_nonsense_settings(cap: int, floor: int, alpha: float, beta: float) -> None:
    with pytest.raises(ValueError):
        AdaptiveLimiter(cap, floor=floor, alpha=alpha, beta=beta)


# --- admission ---------------------------------------------------------------------------------


async def _acquire_async(limiter: AdaptiveLimiter, count: int) -> list[Slot]:
    return [await limiter.acquire("k") for _ in range(count)]


def _acquire(limiter: AdaptiveLimiter, count: int) -> list[Slot]:
    return asyncio.run(_acquire_async(limiter, count)) if count else []


def test_waiters_are_served_in_order_and_cancelled_ones_pass_their_turn() -> None:
    limiter, _ = make(cap=2, floor=2)

    async def scenario() -> list[str]:
        order: list[str] = []
        held = [await limiter.acquire("k") for _ in range(2)]

        async def wait(name: str) -> None:
            async with limiter.slot("k"):
                order.append(name)

        tasks = {name: asyncio.create_task(wait(name)) for name in ("a", "b", "c")}
        await asyncio.sleep(0)
        tasks["b"].cancel()
        for slot in held:
            limiter.release(slot)
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        return order

    assert asyncio.run(scenario()) == ["a", "c"]
    assert limiter.in_flight == 0


def test_a_waiter_cancelled_after_being_let_in_gives_the_place_back() -> None:
    limiter, _ = make(cap=1, floor=1)

    async def scenario() -> None:
        held = await limiter.acquire("k")
        first = asyncio.create_task(limiter.acquire("k"))
        second = asyncio.create_task(limiter.acquire("k"))
        await asyncio.sleep(0)
        limiter.release(held)  # lets `first` in...
        first.cancel()  # ...which is cancelled before it runs
        slot = await second
        assert limiter.in_flight == 1
        limiter.release(slot)

    asyncio.run(scenario())
    assert limiter.in_flight == 0
