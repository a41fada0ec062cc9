"""What a run added up to, and the end every run shares.

`RunTotals` is the same for a plain run (`_run.batch.BatchRun`), a shard of a fanned-out job
(which keeps them for its parent: `_run.fanout.Shard.save`) and the parent (the shards' totals
summed: `_run.fanout.FannedOut`). A flow builds its result from these alone, so one result builder
and one `RunTotals.finish` serve all three: the table artifacts, the outputs as assets, the
summary, the completion event, then the failure rule.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from typing import Any, TypeVar

from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel

from .._outputs.assets import assets_section, materialize_outputs, output_locations
from .artifacts import publish_summary, publish_tables
from .events import emit_completed
from .stats import RequestFigures

__all__ = ["ImageCounts", "RunTotals", "TooManyFailuresError", "check_failure_rate"]

R = TypeVar("R", bound=BaseModel)
SAMPLE_ROWS = 5


class ImageCounts(RequestFigures):
    """A flow result's image counts: taken, with a result, failed."""

    images: int
    succeeded: int
    failed: int
    indexed: int = 0  # rows this run added to its vector index (``index_path``)


class TooManyFailuresError(RuntimeError):
    """More images failed than the flow's ``max_failure_rate`` allows (outputs are still written)."""


def check_failure_rate(failed: int, images: int, max_failure_rate: float) -> None:
    """The flows' failure rule: raise `TooManyFailuresError` when more than the allowed share failed."""
    if images and failed / images > max_failure_rate:
        raise TooManyFailuresError(
            f"{failed} of {images} images failed ({failed / images:.0%}), above max_failure_rate={max_failure_rate:.0%}"
        )


class RunTotals:
    """What a run's images and rows added up to, and the end of the run.

    Attributes:
        images: How many images (a crop batch's parents, else its records) the run took.
        images_failed: How many of them some step failed.
        videos: How many of the source's references are videos (their frames are the run's images).
        source: The run's image source, the assets' upstream (None where the run does not know it).
        statuses: Rows written, by ``status``.
        labels: Rows written, by ``label``.
        sample: The first rows written, for the summary.
    """

    def __init__(self, flow_key: str) -> None:
        self.flow_key = flow_key
        self.images = self.images_failed = self.videos = 0
        self.source: Any = None
        self.statuses: Counter[str] = Counter()
        self.labels: Counter[str] = Counter()
        self.sample: list[dict[str, Any]] = []
        #: What the run warns its user of: logged as it happens, listed first in the summary.
        self.warnings: list[str] = []
        self._figures: dict[str, Any] = {"requests": 0, "retries": 0, "server_seconds": 0.0, "from_cache": 0}

    def warn(self, message: str) -> None:
        """Warn the run's user: a warning in the run's log now, and at the top of its summary."""
        get_run_logger().warning(message)
        self.warnings.append(message)

    def tally(self, rows: Sequence[dict[str, Any]]) -> None:
        """Count rows written: their statuses and labels, the first ones kept as the sample."""
        self.statuses.update(row["status"] for row in rows)
        self.labels.update(row["label"] for row in rows if row.get("label") is not None)
        self.sample.extend(rows[: max(0, SAMPLE_ROWS - len(self.sample))])

    def figures(self) -> dict[str, Any]:
        """The run's `RequestFigures`, as keyword arguments for a result model."""
        return dict(self._figures)

    def counts(self) -> dict[str, Any]:
        """The run's `ImageCounts` (with its `RequestFigures`), as keyword arguments for a result model."""
        return {
            "images": self.images,
            "succeeded": self.statuses["ok"],
            "failed": self.statuses["failed"],
            **self.figures(),
        }

    def sections(self) -> list[str]:
        """Markdown the run adds to its summary after the flow's own sections."""
        return []

    def tables(self) -> list[tuple[str, str, list[dict[str, Any]]]]:
        """The run's table artifacts: ``(key suffix, description, rows)``."""
        return []

    def models(self) -> list[str]:
        """The models the run's steps used (for its assets' metadata)."""
        return []

    def dump(self) -> dict[str, Any]:
        """The totals as JSON values (the sample keeps its scalar columns only)."""
        scalar = (str, int, float, bool, type(None))
        return {
            "images": self.images,
            "images_failed": self.images_failed,
            "statuses": dict(self.statuses),
            "labels": dict(self.labels),
            "figures": self.figures(),
            "sample": [{k: v for k, v in row.items() if isinstance(v, scalar)} for row in self.sample],
        }

    def add(self, dumped: dict[str, Any]) -> None:
        """Fold in totals `dump` made (a shard's), checked: a stored file is input too.

        Raises:
            ValueError: when ``dumped`` does not hold totals.
        """
        try:
            images, failed = int(dumped.get("images", 0)), int(dumped.get("images_failed", 0))
            statuses = Counter({str(k): int(v) for k, v in dict(dumped.get("statuses", {})).items()})
            labels = Counter({str(k): int(v) for k, v in dict(dumped.get("labels", {})).items()})
            figures = {k: dict(dumped.get("figures", {})).get(k, 0) for k in self._figures}
            sample = [dict(row) for row in dumped.get("sample", [])]
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a run's totals: {exc}") from None
        self.images += images
        self.images_failed += failed
        self.statuses.update(statuses)
        self.labels.update(labels)
        for name, value in figures.items():
            self._figures[name] += value
        self.sample.extend(sample[: max(0, SAMPLE_ROWS - len(self.sample))])

    async def finish(self, result: R, title: str, sections: Sequence[str], max_failure_rate: float) -> R:
        """The end of every run: its table artifacts, its outputs as assets, its summary, the
        completion event, then the failure rule over all the images it took."""
        figures = {"images": self.images, "rows": sum(self.statuses.values()), "failed": self.statuses["failed"]}
        locations = output_locations(result.model_dump(), flow_run.parameters or {})
        # The table artifacts and the assets task are independent requests: sent together.
        assets = materialize_outputs(self.flow_key, locations, self.source, figures, self.models())
        keys, _ = await asyncio.gather(assets, publish_tables(self.flow_key, self.tables()))
        extra = [assets_section(keys)] if keys else []
        warned = ["## Warnings\n\n" + "".join(f"- {w}\n" for w in self.warnings)] if self.warnings else []
        await publish_summary(self.flow_key, title, [*warned, *sections, *self.sections(), *extra])
        emit_completed(self.flow_key, result.model_dump())
        check_failure_rate(self.images_failed, self.images, max_failure_rate)
        return result
