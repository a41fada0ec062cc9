"""What a finished flow run left in the Prefect API, read as a user would in the UI: its markdown
summary, its logs."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)


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
