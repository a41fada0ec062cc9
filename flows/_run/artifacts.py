"""A run's artifacts: its markdown summary and its tables."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact

__all__ = ["markdown_table", "publish_summary", "publish_tables"]


async def publish_summary(flow_key: str, title: str, sections: Sequence[str]) -> None:
    """The run's markdown summary artifact."""
    text = "\n\n".join([f"# {title}", *sections])
    await acreate_markdown_artifact(text, key=f"{flow_key}-summary", description=title)


async def publish_tables(flow_key: str, tables: Sequence[tuple[str, str, list[dict[str, Any]]]]) -> None:
    """Table artifacts ``<flow_key>-<suffix>``, one per ``(suffix, description, rows)``, sent together."""
    sends = [acreate_table_artifact(rows, key=f"{flow_key}-{name}", description=text) for name, text, rows in tables]
    await asyncio.gather(*sends)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A small markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)
