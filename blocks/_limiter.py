"""An adaptive concurrency limit for one inference server: how many requests to keep in flight.

The right number depends on where the server is. On loopback a CPU-bound server is saturated by
two to four requests, and more only queue; across a 50 ms link a client needs eight to sixteen in
flight to keep the same server busy; a server behind a concurrency limiter answers 429 beyond its
own limit. `AdaptiveLimiter` finds the number while requests run, so nobody has to set it.

The algorithm is TCP Vegas's (and Netflix concurrency-limits' ``VegasLimit``), measured in rounds,
with AIMD for overload signals:

- **Queue estimate (Little's law).** ``rtt_noload`` is the lowest median latency of a round's answers
  of one kind (its endpoint and payload size, within 2x; pooled over rounds until `BASE_SAMPLES` are
  in; never forgotten, so that a long busy stretch does not pass for the norm). With ``n`` requests in
  flight and a round's median latency ``rtt``, the server and the link hold ``n * rtt_noload / rtt``
  requests without queueing (the bandwidth-delay product) and the other
  ``queue = n * (1 - rtt_noload / rtt)`` wait. A median, not the fastest answer: latency carries
  noise that does not depend on the load (a shared machine's scheduling, a proxy, the client's own
  work between its requests), and the fastest answer is the one that met none of it. Measured
  against it, every round looked queued by ``n`` times the noise's share of the latency: through a
  +50 ms proxy on a loaded machine the limit held 8–10 where 16 kept the server busy. Throughput is
  ``n / rtt``: while latency holds, a larger ``n`` is more throughput; once the server is saturated
  latency grows in step with ``n`` and only the queue grows.
- **Rounds.** Every ``limit`` answers (about one round trip; only answers to requests sent since the
  last decrease count, as the others measured a load that is gone) the limiter decides once: queue below
  ``alpha`` (latency holds, throughput still rises) → grow, doubling in the initial slow start and by
  one afterwards, but only when the limit was actually reached (a caller with three requests does
  not earn a limit of 64); queue above ``beta`` (latency rising) → shrink to what the path holds plus
  ``beta``, never below half; in between → hold. A shrink on latency never goes below ``beta``, so a
  wrong ``rtt_noload`` (heavier images later) cannot starve the client.
- **Overload (AIMD).** A 429, 502-504 or timeout halves the limit at once (TCP's multiplicative
  decrease), once per round trip: answers to requests sent before the last decrease do not count
  again. The limit where it happened becomes a ceiling: growing to it again (a probe) waits for
  ``probe_gap`` good answers, doubled after each probe that fails; ``probe_gap`` good answers at
  the ceiling lift it. After the first overload the limit grows by one at a time, so each later
  excursion above what a server admits costs one 429: a server that admits ``k`` requests sees a
  few 429s at the start, then ``O(log answers)``.

The limit stays within ``[floor, cap]``; ``cap`` is the block's ``max_concurrency``. Everything is
counted in answers, not seconds, and the clock is injected, so tests drive it with made-up latencies.
The limiter belongs to one event loop (the engine's) and is not thread-safe.

Alternatives considered: Gradient2 (short against long average latency) follows a latency that rises
in step with the limit and drifts up to the cap on a CPU-bound server; plain AIMD on errors alone
grows until the server fails, i.e. to the cap on a server that queues instead of answering 429.

Examples:
    ```python
    limiter = AdaptiveLimiter(cap=64)
    async with limiter.slot("/clip/embed_image") as slot:
        response = await client.post(...)
        slot.signal = Signal.OK if response.is_success else Signal.IGNORE
    limiter.limit  # 8 after a round in which latency held
    ```
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass

__all__ = ["BASE_SAMPLES", "AdaptiveLimiter", "Signal", "Slot"]

#: Latencies below this (seconds) are not told apart: a fake clock's zero latency is not infinitely fast.
_RESOLUTION = 1e-4
#: Failed probes double the wait before the next one, up to 2**this times ``probe_gap``.
_MAX_STRIKES = 5
#: Answers of one kind pooled (over rounds if need be) before their median may become its ``rtt_noload``.
BASE_SAMPLES = 3


class Signal(enum.Enum):
    """What an answer says about the server's load."""

    OK = "ok"  # an answer: a latency sample
    OVERLOAD = "overload"  # 429, 502-504, a timeout: too many in flight
    IGNORE = "ignore"  # anything else (a 4xx, a reset): says nothing about load


@dataclass
class Slot:
    """One request's place in flight; set `signal` before the slot is released."""

    key: Hashable
    started: float
    epoch: int
    signal: Signal = Signal.IGNORE


class AdaptiveLimiter:
    """Vegas-style adaptive concurrency limit with AIMD on overload (see the module doc).

    Args:
        cap: The most requests in flight, whatever the measurements say.
        initial: The starting limit (clipped to ``[floor, cap]``).
        floor: The fewest; ``floor == cap`` makes a fixed limit.
        alpha: Grow while fewer than this many requests are estimated to queue.
        beta: Shrink when more than this many are estimated to queue.
        probe_gap: Good answers to wait, after an overload, before growing to where it happened.
        clock: Seconds, monotonic; injected by tests.

    Examples:
        ```python
        fixed = AdaptiveLimiter(cap=8, floor=8)
        fixed.limit  # 8, always
        ```
    """

    def __init__(
        self,
        cap: int,
        *,
        initial: int = 4,
        floor: int = 1,
        alpha: float = 3.0,
        beta: float = 6.0,
        probe_gap: int = 16,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= floor <= cap:
            raise ValueError(f"need 1 <= floor <= cap, got floor={floor}, cap={cap}")
        if not 0 <= alpha <= beta:
            raise ValueError(f"need 0 <= alpha <= beta, got alpha={alpha}, beta={beta}")
        self.cap, self.floor, self.alpha, self.beta = cap, floor, alpha, beta
        self.probe_gap = probe_gap
        self._clock = clock
        self._limit = min(cap, max(floor, initial))
        self.peak = self._limit
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._noload: dict[Hashable, float] = {}  # per kind: the lowest median latency of a pool
        self._pool: dict[Hashable, list[float]] = {}  # per kind: latencies not yet in a median
        self._slow_start = True
        self._epoch = 0  # bumped by each decrease on overload
        self._ceiling: int | None = None  # the limit at the last overload, until a probe passes it
        self._strikes = 0  # probes that failed since the ceiling was last passed
        self._good_since_overload = 0
        self._good_at_ceiling = 0
        self._round: list[tuple[Hashable, float, int]] = []  # (kind, latency, requests in flight)
        self._saturated = False  # the limit was reached during this round
        self.overloads = 0

    @property
    def limit(self) -> int:
        """How many requests may be in flight now."""
        return self._limit

    # --- admission ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def slot(self, key: Hashable) -> AsyncIterator[Slot]:
        """Wait for room, hold a place while the body runs, then learn from ``slot.signal``.

        Args:
            key: What kind of request this is (endpoint and size): latencies are compared per key.
        """
        slot = await self.acquire(key)
        try:
            yield slot
        finally:
            self.release(slot)

    async def acquire(self, key: Hashable) -> Slot:
        """Wait until fewer than `limit` requests are in flight (first come, first served)."""
        if self.in_flight < self._limit and not self._waiters:
            self.in_flight += 1
        else:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter  # `_wake` counts us in before it wakes us
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self.in_flight -= 1  # woken and cancelled at once: pass the place on
                    self._wake()
                raise
        if self.in_flight >= self._limit:
            self._saturated = True
        return Slot(key, self._clock(), self._epoch)

    def release(self, slot: Slot) -> None:
        """Give the place back and adjust the limit from what the request met."""
        if slot.signal is Signal.OK:
            self._sample(slot)
        elif slot.signal is Signal.OVERLOAD:
            self._overload(slot)
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    # --- the algorithm --------------------------------------------------------------------------

    def _sample(self, slot: Slot) -> None:
        latency = max(_RESOLUTION, self._clock() - slot.started)
        if slot.epoch != self._epoch:
            return  # sent before the last decrease: it measured a load that is gone
        self._round.append((slot.key, latency, self.in_flight))
        self._good_since_overload += 1
        if self._ceiling is not None and self._limit >= self._ceiling:
            self._good_at_ceiling += 1
            if self._good_at_ceiling >= self.probe_gap:  # the probe passed: the server takes more now
                self._ceiling, self._strikes = None, max(0, self._strikes - 1)
        if len(self._round) >= self._limit:
            self._end_round()

    def _end_round(self) -> None:
        # Judged against the no-load latencies known before this round, which then joins them.
        judged = [(latency / self._noload[key], n) for key, latency, n in self._round if key in self._noload]
        for key, latency, _ in self._round:
            self._pool.setdefault(key, []).append(latency)
        for key, pool in self._pool.items():
            if len(pool) >= BASE_SAMPLES:
                self._noload[key] = min(statistics.median(pool), self._noload.get(key, math.inf))
                pool.clear()
        ratio, in_flight, queue = 1.0, 0.0, 0.0  # no kind known yet: nothing says anything queues
        if judged:
            ratio = statistics.median(r for r, _ in judged)
            in_flight = statistics.fmean(n for _, n in judged)
            queue = in_flight * (1 - 1 / ratio)
        if queue < self.alpha:
            if self._saturated:
                self._set(self._grown())
        else:
            self._slow_start = False
            if queue > self.beta and self._limit > self.beta:
                holds = in_flight / ratio  # what the server and link hold without queueing
                self._set(min(self._limit - 1, max(math.ceil(self._limit / 2), int(holds + self.beta))))
        self._round.clear()
        self._saturated = False

    def _grown(self) -> int:
        target = min(self.cap, self._limit * 2 if self._slow_start else self._limit + 1)
        gap = self.probe_gap << min(self._strikes, _MAX_STRIKES)
        if self._ceiling is not None and target >= self._ceiling and self._good_since_overload < gap:
            target = max(self._limit, self._ceiling - 1)
        return target

    def _overload(self, slot: Slot) -> None:
        self.overloads += 1
        if slot.epoch != self._epoch or self._limit <= self.floor:
            return  # sent before the last decrease (already answered for), or nothing left to cut
        if self._ceiling is not None and self._limit >= self._ceiling - 1:
            self._strikes += 1  # a probe at (or next to) the last ceiling failed
        self._ceiling = self._limit
        self._epoch += 1
        self._slow_start = False
        self._good_since_overload = self._good_at_ceiling = 0
        self._round.clear()
        self._saturated = False
        self._set(min(self._limit - 1, math.ceil(self._limit / 2)))

    def _set(self, limit: int) -> None:
        self._limit = min(self.cap, max(self.floor, limit))
        self.peak = max(self.peak, self._limit)
        self._wake()
