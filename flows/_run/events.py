"""The events a run emits, for automations to match."""

from __future__ import annotations

from typing import Any

from prefect.events import emit_event
from prefect.runtime import flow_run

__all__ = ["EVENT_PREFIX", "emit_completed"]

EVENT_PREFIX = "prefect_roboflow"


def emit_completed(flow_key: str, summary: dict[str, Any]) -> None:
    """``prefect_roboflow.<flow>.completed``, for automations to match."""
    run_id = flow_run.get_id() or "unknown"
    emit_event(
        event=f"{EVENT_PREFIX}.{flow_key.replace('-', '_')}.completed",
        resource={"prefect.resource.id": f"{EVENT_PREFIX}.flow-run.{run_id}", "prefect.resource.name": flow_key},
        payload=summary,
    )
