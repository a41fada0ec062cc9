"""Pipelining: each batch's task chain submitted while the batches before it finish.

While one batch's tasks finish (their last requests, then ~0.1 s of Prefect bookkeeping), the
next is already reading its images and sending requests, so the server never idles between
batches. The engine's concurrency limit still bounds the requests in flight.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import Any, TypeVar

from prefect.context import SyncClientContext
from prefect.futures import PrefectFuture

__all__ = ["finished"]

T = TypeVar("T")


async def finished(
    batches: Iterable[T], submit: Callable[[T], PrefectFuture[T]], window: int = 2
) -> AsyncGenerator[T, None]:
    """Each batch as its submitted tasks return it, in order, ``window`` batches in flight.

    The flow's event loop only submits and awaits: the next batch is made (its references read
    back, a video's frames decoded) and each task chain waited for on worker threads.

    One sync API client serves every task of the run: a task run in a worker thread otherwise
    opens its own (~20 ms of CPU each, mostly its TLS context: the warm run's largest cost). The
    tasks are submitted from a context that holds it (Prefect's sync flows do the same), entered
    (on a worker thread: a TLS context and a request) and left inside that context, wherever this
    generator is closed.
    """
    shared = contextvars.copy_context()
    client = await asyncio.to_thread(shared.run, _enter_sync_client)
    made = iter(batches)
    pending: deque[PrefectFuture[T]] = deque()
    try:
        while True:
            batch = await asyncio.to_thread(next, made, _END)
            if batch is _END:
                break
            pending.append(shared.run(submit, batch))
            if len(pending) >= window:
                yield await _result(pending.popleft())
        while pending:
            yield await _result(pending.popleft())
    finally:
        await asyncio.to_thread(shared.run, client.__exit__, None, None, None)


_END: Any = object()


async def _result(future: PrefectFuture[T]) -> T:
    """The batch a task chain returns, waited for and taken from its final state on a worker thread
    (`PrefectFuture.result` reads the state through Prefect's own event loop thread): the steps run
    in the task runner's threads meanwhile, and the flow's loop stays free for the run's own
    requests (the progress artifact)."""
    return await asyncio.to_thread(future.result)


def _enter_sync_client() -> SyncClientContext:
    """The current sync client context entered (a new one when there is none)."""
    context = SyncClientContext.get() or SyncClientContext()
    return context.__enter__()
