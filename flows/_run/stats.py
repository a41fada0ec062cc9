"""Step statistics: what each step of a run did, its batches' `StepReport`s added up.

`StepFigures` keeps one `StepStats` per step in the order the steps first reported; a run's
`RequestFigures` (requests, retries, server time, answers from the cache) are its sums, and its
rows are the per-step table artifact.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from ..records import StepReport

__all__ = ["RequestFigures", "StepFigures", "StepStats"]


class RequestFigures(BaseModel):
    """What a flow run asked of the server, summed over its steps."""

    requests: int
    retries: int
    server_seconds: float
    from_cache: int


@dataclass
class StepStats(StepReport):
    """What one step did over a run: its batches' reports added up, for the step table artifact."""

    batches: int = 0
    requests: int = 0
    retries: int = 0
    server_seconds: float = 0.0
    concurrency_limit: int = 0  # the server's adaptive limit at the step's last answer
    concurrency_peak: int = 0
    per_server: Counter[str] = field(default_factory=Counter)  # answers by server base URL

    def add(self, report: StepReport) -> None:
        """Fold one batch's report in."""
        self.batches += 1
        self.items += report.items
        self.cached += report.cached
        self.sent += report.sent
        self.failed += report.failed
        self.dropped += report.dropped
        self.seconds += report.seconds
        self.requests += len(report.infos)
        self.retries += sum(i.attempts - 1 for i in report.infos)
        self.server_seconds += sum(i.server_time or 0.0 for i in report.infos)
        self.per_server.update(i.server for i in report.infos)
        if report.infos:
            self.concurrency_limit = report.infos[-1].concurrency_limit
            self.concurrency_peak = max(self.concurrency_peak, *(i.concurrency_limit for i in report.infos))

    def row(self) -> dict[str, Any]:
        """The step's row of the table artifact."""
        counts = ("batches", "items", "cached", "sent", "failed", "dropped", "requests", "retries", "concurrency_limit")
        return {
            "step": self.step,
            "model": self.model,
            **{name: getattr(self, name) for name in counts},
            "server_seconds": round(self.server_seconds, 3),
            "wall_seconds": round(self.seconds, 3),
            "concurrency_peak": self.concurrency_peak,
            "requests_per_server": ", ".join(f"{url}: {n}" for url, n in sorted(self.per_server.items())),
        }


class StepFigures(dict[str, StepStats]):
    """A run's `StepStats` by step name, in the order the steps first reported."""

    def add(self, reports: Iterable[StepReport]) -> None:
        """Fold one batch's reports in."""
        for report in reports:
            self.setdefault(report.step, StepStats(report.step, report.model)).add(report)

    def figures(self) -> dict[str, Any]:
        """The run's `RequestFigures`, summed over its steps, as keyword arguments."""
        steps = self.values()
        return {
            "requests": sum(s.requests for s in steps),
            "retries": sum(s.retries for s in steps),
            "server_seconds": round(sum(s.server_seconds for s in steps), 6),
            "from_cache": sum(s.cached for s in steps),
        }

    def models(self) -> list[str]:
        """The models the steps used."""
        return [s.model for s in self.values()]

    def rows(self) -> list[dict[str, Any]]:
        """The per-step table's rows."""
        return [s.row() for s in self.values()]
