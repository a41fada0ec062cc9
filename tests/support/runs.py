"""What a finished flow run left in the Prefect API, read as a user would in the UI: its markdown
summary, its logs, its task runs."""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import TaskRun
from prefect.events.worker import EventsWorker


def summary_of(state: Any, key: str) -> str:
    """The markdown summary artifact ``key`` (e.g. ``"auto-label-summary"``) of the run whose final
    ``state`` a flow call returned (``return_state=True``)."""
    run_id: UUID = state.state_details.flow_run_id

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
            )

    return next(a.data for a in asyncio.run(read()) if a.key == key)


def logs_of(state: Any, timeout: float = 60.0) -> list[str]:
    """The messages the run (its tasks included) logged, oldest first: read once the flow run's own
    last line ("Finished in state ...") has reached the API (Prefect sends logs in the background).
    """
    run_id: UUID = state.state_details.flow_run_id

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))

    deadline = time.monotonic() + timeout
    while True:
        logs = asyncio.run(read())
        ended = any(log.task_run_id is None and log.message.startswith("Finished in state") for log in logs)
        if ended or time.monotonic() > deadline:
            return [log.message for log in logs]
        time.sleep(0.2)


async def task_runs_of(flow_run_id: Any, count: int, timeout: float = 60.0) -> list[TaskRun]:
    """The flow run's task runs, once the API holds at least ``count`` of them, each in a final state.

    Prefect's server records task runs from their events, after the flow run may have returned (in a
    CI run a run's last task run was written 0.1 s after the run was Completed; a task run is first
    stored under a default name, its own arriving with a later state). The events this process has
    queued are sent first. Past ``timeout`` it returns what there is, for the caller's assertion.
    """
    drained = EventsWorker.drain_all()  # in a running loop: an awaitable
    if inspect.isawaitable(drained):
        await drained
    deadline = time.monotonic() + timeout
    while True:
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        if len(runs) >= count and all(r.state is not None and r.state.is_final() for r in runs):
            return runs
        if time.monotonic() > deadline:
            return runs
        await asyncio.sleep(0.2)
