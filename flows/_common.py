"""What every flow shares: the server and model to use, per-step statistics, progress,
artifacts, the completion event, and the failure-rate rule."""

from __future__ import annotations

import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.blocks.core import Block
from prefect.events import emit_event
from prefect.filesystems import WritableFileSystem
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.settings import PREFECT_HOME
from prefect_roboflow.blocks import Clip, InferenceServer, PerceptionEncoder, ResponseInfo
from prefect_roboflow.blocks._http import describe_responses
from prefect_roboflow.blocks.exceptions import InvalidInputError
from pydantic import BaseModel

from ._cache import ContentCache

EmbeddingFamily = Literal["clip", "perception_encoder"]
T = TypeVar("T")
F = TypeVar("F")
DEFAULT_SERVER_URL = "http://localhost:9001"
EVENT_PREFIX = "prefect_roboflow"


def resolve_server(server: str | InferenceServer | None) -> InferenceServer:
    """An `InferenceServer` from a block, a saved block name, or a URL.

    ``None`` means the ``INFERENCE_SERVER_URL`` environment variable, then
    ``http://localhost:9001``.
    """
    if isinstance(server, InferenceServer):
        return server
    if server is None:
        server = os.environ.get("INFERENCE_SERVER_URL") or DEFAULT_SERVER_URL
    if "://" in server:
        return InferenceServer(api_url=server)
    name = server.split("/", 1)[1] if server.startswith("roboflow-inference-server/") else server
    return InferenceServer.load(name)


def embedding_model(family: EmbeddingFamily, version: str | None, server: InferenceServer) -> Clip | PerceptionEncoder:
    """The embedding block of a family, at its default version unless one is given."""
    if family == "clip":
        return Clip(server=server) if version is None else Clip(server=server, version=version)
    if family == "perception_encoder":
        model = PerceptionEncoder(server=server)
        return model if version is None else PerceptionEncoder(server=server, version=version)
    raise InvalidInputError("model", f"expected 'clip' or 'perception_encoder', got {family!r}")


def model_identity(model: Block) -> dict[str, Any]:
    """What identifies a model's results in a cache key: family and version, nothing else."""
    return {"family": type(model).__name__, "version": getattr(model, "version", None)}


def resolve_cache(cache_storage: str | None) -> tuple[ContentCache, Path | str]:
    """The per-item cache and the Prefect result storage for a flow.

    ``cache_storage`` is a local folder, or a saved `WritableFileSystem` block as
    ``"block-type-slug/name"`` (e.g. ``"s3-bucket/cache"``); ``None`` means
    ``$PREFECT_HOME/prefect-roboflow-cache``.
    """
    if (
        cache_storage is None
        or "/" not in cache_storage
        or os.path.isabs(cache_storage)
        or cache_storage.startswith(".")
    ):
        folder = Path(cache_storage) if cache_storage else Path(PREFECT_HOME.value()) / "prefect-roboflow-cache"
        folder = folder.expanduser().resolve()
        return ContentCache(folder), folder / "task-results"
    block = Block.load(cache_storage)
    if not isinstance(block, WritableFileSystem):
        raise InvalidInputError("cache_storage", f"{cache_storage} is not a writable file system block")
    return ContentCache(block), cache_storage


def _looks_like_block_slug(value: str) -> bool:
    """``"block-type/name"`` rather than a relative path (a path that exists wins)."""
    return re.fullmatch(r"[a-z0-9-]+/[\w-]+", value) is not None and not Path(value).exists()


@dataclass
class StepStats:
    """What one step did over a run, for the step table artifact."""

    step: str
    model: str = ""
    batches: int = 0
    items: int = 0
    cached: int = 0
    sent: int = 0
    failed: int = 0
    requests: int = 0
    retries: int = 0
    server_seconds: float = 0.0
    wall_seconds: float = 0.0

    def add_responses(self, infos: Sequence[ResponseInfo]) -> None:
        """Account for the requests a batch made."""
        self.requests += len(infos)
        self.retries += sum(i.attempts - 1 for i in infos)
        self.server_seconds += sum(i.server_time or 0.0 for i in infos)


class RequestFigures(BaseModel):
    """What a flow run asked of the server, summed over its steps."""

    requests: int
    retries: int
    server_seconds: float
    from_cache: int

    @classmethod
    def of(cls, *steps: StepStats) -> dict[str, Any]:
        """The figures of these steps, as keyword arguments for a result model."""
        return {
            "requests": sum(s.requests for s in steps),
            "retries": sum(s.retries for s in steps),
            "server_seconds": round(sum(s.server_seconds for s in steps), 6),
            "from_cache": sum(s.cached for s in steps),
        }


@dataclass
class BatchReport:
    """What a batch task reports about itself (returned beside its results)."""

    items: int = 0
    cached: int = 0
    sent: int = 0
    failed: int = 0
    seconds: float = 0.0
    infos: list[ResponseInfo] = field(default_factory=list)

    def into(self, stats: StepStats) -> None:
        """Fold this batch into the run's step statistics."""
        stats.batches += 1
        stats.items += self.items
        stats.cached += self.cached
        stats.sent += self.sent
        stats.failed += self.failed
        stats.add_responses(self.infos)
        stats.wall_seconds += self.seconds

    def log(self, step: str) -> None:
        """Log the batch's figures and the server's timings."""
        get_run_logger().info(
            "%s: %d item(s), %d from cache, %d sent, %d failed; %s",
            step,
            self.items,
            self.cached,
            self.sent,
            self.failed,
            describe_responses(self.infos),
        )


class Progress:
    """A progress artifact on the flow run, advanced per batch.

    Updates go to the API at most once per ``interval`` seconds (and always at the end): a
    cached rerun finishes a batch in milliseconds, and an API call per batch would dominate it.
    """

    def __init__(self, total_batches: int, description: str, interval: float = 1.0) -> None:
        self.total = max(1, total_batches)
        self.done = 0
        self.interval = interval
        self._sent_at = time.monotonic()
        self._id: UUID | None = create_progress_artifact(0.0, description=description)  # type: ignore[assignment]

    def advance(self) -> None:
        """One more batch done."""
        self.done += 1
        now = time.monotonic()
        if self._id is not None and (self.done >= self.total or now - self._sent_at >= self.interval):
            update_progress_artifact(self._id, 100.0 * self.done / self.total)
            self._sent_at = now


def pipelined(batches: Iterable[T], submit: Callable[[T], F], window: int = 2) -> Iterator[tuple[T, F]]:
    """Submit work for up to ``window`` batches ahead, yielding ``(batch, future)`` in order.

    While one batch's task finishes (its last requests, then ~0.1 s of Prefect bookkeeping),
    the next is already reading its images and sending requests, so the server never idles
    between batches. The engine's concurrency limit still bounds the requests in flight.
    """
    pending: deque[tuple[T, F]] = deque()
    for batch in batches:
        pending.append((batch, submit(batch)))
        if len(pending) >= window:
            yield pending.popleft()
    while pending:
        yield pending.popleft()


def batch_label(index: int, total: int) -> str:
    """``"3/12"``: which batch of how many, for task run names."""
    return f"{index + 1}/{total}"


def publish_step_table(flow_key: str, steps: Sequence[StepStats]) -> None:
    """One table artifact with a row per step."""
    rows = [
        {**asdict(s), "server_seconds": round(s.server_seconds, 3), "wall_seconds": round(s.wall_seconds, 3)}
        for s in steps
    ]
    create_table_artifact(rows, key=f"{flow_key}-steps", description=f"Per-step figures of this {flow_key} run.")


def publish_summary(flow_key: str, title: str, sections: Sequence[str]) -> None:
    """The run's markdown summary artifact."""
    create_markdown_artifact("\n\n".join([f"# {title}", *sections]), key=f"{flow_key}-summary", description=title)


def emit_completed(flow_key: str, summary: dict[str, Any]) -> None:
    """``prefect_roboflow.<flow>.completed``, for automations to match."""
    run_id = flow_run.get_id() or "unknown"
    emit_event(
        event=f"{EVENT_PREFIX}.{flow_key.replace('-', '_')}.completed",
        resource={"prefect.resource.id": f"{EVENT_PREFIX}.flow-run.{run_id}", "prefect.resource.name": flow_key},
        payload=summary,
    )


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A small markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


class TooManyFailuresError(RuntimeError):
    """More images failed than the flow's ``max_failure_rate`` allows (outputs are still written)."""


def check_failure_rate(failed: int, total: int, max_failure_rate: float) -> None:
    """Fail the flow run when the share of failed images exceeds the limit."""
    if total and failed / total > max_failure_rate:
        raise TooManyFailuresError(
            f"{failed} of {total} images failed ({failed / total:.0%}), above max_failure_rate={max_failure_rate:.0%}"
        )


def ensure_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """The output folder, created."""
    path = Path(out_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
