"""The shipped flows are async Prefect flows that plain sync code can still call.

An async flow run costs Prefect ~0.2 s; a sync one ~1.1 s, most of it joining the engine's
heartbeat thread, which sleeps in one-second steps (prefect 3.8.8). Webhook- and schedule-started
runs over a few new images are mostly that fixed cost, so the flows are async. Called like
their async twins' blocks methods are (`async_dispatch`): from sync code (a script, a sync flow,
a thread) the call runs the flow to its end and returns its result; from async code (a coroutine,
a Jupyter cell, an async flow) it returns the awaitable, as any async Prefect flow does.
Deployments, `serve`, workers and `run_deployment` run them as the async flows they are.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar, cast

from prefect import Flow
from prefect.utilities.asyncutils import run_coro_as_sync

from prefect_roboflow.blocks.tasks import run_name

__all__ = ["roboflow_flow"]

P = ParamSpec("P")
R = TypeVar("R")


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class SyncCallableFlow(Flow[P, R]):
    """An async flow whose call, outside an event loop, runs it to its end."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        called = super().__call__(*args, **kwargs)
        if inspect.isawaitable(called) and not _in_event_loop():
            return run_coro_as_sync(cast(Coroutine[Any, Any, Any], called))
        return called

    def validate_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        """The flow's parameter contract (see `parameters`) on the values as given, then Prefect's
        cast to the signature's types: a mistake is an `InvalidInputError` naming the parameter."""
        from .parameters import contract_of

        check = contract_of(self.fn)
        if check is not None:
            check(parameters)
        return super().validate_parameters(parameters)

    def with_options(self, **options: Any) -> SyncCallableFlow[P, R]:
        """`Flow.with_options`, keeping the sync call."""
        flow = super().with_options(**options)
        flow.__class__ = type(self)
        return cast(SyncCallableFlow[P, R], flow)


def roboflow_flow(**options: Any) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], Flow[P, R]]:
    """``@flow(**options)`` for an ``async def``, typed as the sync call it also offers.

    A ``flow_run_name`` template is formatted with the run's parameters, as Prefect does, and
    the run of a shard (see `fanout`) adds which part and attempt it is.
    """
    if isinstance(options.get("flow_run_name"), str):
        options["flow_run_name"] = _run_name(options["flow_run_name"])

    def decorate(fn: Callable[P, Coroutine[Any, Any, R]]) -> Flow[P, R]:
        return cast(Flow[P, R], SyncCallableFlow(fn=fn, **options))

    return decorate


def _run_name(template: str) -> Callable[[], str]:
    def name() -> str:
        from prefect.context import FlowRunContext

        from .fanout import Shard

        context = FlowRunContext.get()
        parameters = dict(context.parameters or {}) if context else {}
        shard = parameters.get("shard")
        step, _, label = template.format(**parameters).partition("[")
        return run_name(step, label.rstrip("]") or None, Shard.model_validate(shard).label if shard else "")

    return name
