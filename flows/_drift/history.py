"""The drift history: ``drift.parquet`` (a row per method per run, appended by rewriting the table
whole) and a PNG plot of each method's score over the past runs against its threshold.

One monitor writes an ``out_dir`` at a time (two runs appending at once could lose one's rows:
give the deployment a concurrency limit of 1). The plot is drawn with matplotlib when it is
installed (supervision brings it), else with PIL.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from prefect_roboflow.blocks.exceptions import InvalidInputError

from .._storage.access import join, list_files, read_bytes, write_bytes

__all__ = ["DRIFT_SCHEMA", "HISTORY_FILE", "PLOT_FILE", "append_history", "plot_history", "read_history"]

HISTORY_FILE = "drift.parquet"
PLOT_FILE = "drift.png"
DRIFT_SCHEMA = pa.schema(
    [
        ("run_at", pa.timestamp("us", tz="UTC")),
        ("flow_run_id", pa.string()),
        ("method", pa.string()),
        ("score", pa.float64()),
        ("threshold", pa.float64()),
        ("drifted", pa.bool_()),
        ("n_reference", pa.int64()),
        ("n_current", pa.int64()),
        ("model", pa.string()),
        ("version", pa.string()),
        ("reference", pa.string()),
        ("current", pa.string()),
    ]
)


def read_history(out: str) -> pa.Table:
    """The runs recorded so far in ``out`` (an empty table before the first).

    Raises:
        InvalidInputError: naming ``out_dir``, when ``drift.parquet`` is there but is not a drift history.
    """
    url = join(out, HISTORY_FILE)
    if url not in set(list_files(out)):
        return DRIFT_SCHEMA.empty_table()
    try:
        table = pq.read_table(pa.BufferReader(read_bytes(url, field="out_dir")))
        return table.select(DRIFT_SCHEMA.names).cast(DRIFT_SCHEMA)
    except (pa.ArrowInvalid, KeyError, ValueError) as error:
        raise InvalidInputError("out_dir", f"{url} is not a drift history: {error}") from None


def append_history(out: str, past: pa.Table, rows: Sequence[dict[str, Any]]) -> tuple[str, pa.Table]:
    """``past`` plus ``rows``, written whole to ``out/drift.parquet``; its location and the table."""
    table = pa.concat_tables([past, pa.Table.from_pylist(list(rows), schema=DRIFT_SCHEMA)])
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    url = join(out, HISTORY_FILE)
    write_bytes(url, buffer.getvalue())
    return url, table


def plot_history(table: pa.Table, title: str) -> bytes:
    """A PNG: each method's score per run (oldest left) with its threshold as a dashed line."""
    series: dict[str, list[tuple[float, float, bool]]] = {}
    for row in table.to_pylist():
        series.setdefault(row["method"], []).append((row["score"], row["threshold"], row["drifted"]))
    try:
        return _plot_matplotlib(series, title)
    except ImportError:
        return _plot_pil(series, title)


def _plot_matplotlib(series: dict[str, list[tuple[float, float, bool]]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 2.2 * max(1, len(series))), dpi=100)
    axes = figure.subplots(max(1, len(series)), 1, squeeze=False)[:, 0]
    for ax, (method, points) in zip(axes, series.items(), strict=False):
        runs = list(range(1, len(points) + 1))
        ax.plot(runs, [p[0] for p in points], marker="o", label="score")
        ax.plot(runs, [p[1] for p in points], linestyle="--", color="grey", label="threshold")
        drifted = [(r, p[0]) for r, p in zip(runs, points, strict=True) if p[2]]
        if drifted:
            ax.scatter(*zip(*drifted, strict=True), color="red", zorder=3, label="drifted")
        ax.set_title(method)
        ax.set_xlabel("run")
        ax.legend(loc="best", fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _plot_pil(series: dict[str, list[tuple[float, float, bool]]], title: str) -> bytes:
    from PIL import Image, ImageDraw

    width, panel = 800, 200
    image = Image.new("RGB", (width, 30 + panel * max(1, len(series))), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill="black")
    for i, (method, points) in enumerate(series.items()):
        box = (50, 30 + i * panel + 20, width - 20, 30 + (i + 1) * panel - 20)
        values = [v for p in points for v in p[:2]]
        low, span = min(values), (max(values) - min(values)) or 1.0
        scores = [_point(box, k, len(points), p[0], low, span) for k, p in enumerate(points)]
        draw.text((box[0], box[1] - 16), method, fill="black")
        draw.rectangle(box, outline="grey")
        draw.line([_point(box, k, len(points), p[1], low, span) for k, p in enumerate(points)], fill="grey", width=1)
        draw.line(scores, fill="blue", width=2)
        for (x, y), p in zip(scores, points, strict=True):
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill="red" if p[2] else "blue")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _point(
    box: tuple[int, int, int, int], k: int, count: int, value: float, low: float, span: float
) -> tuple[float, float]:
    """Run ``k`` of ``count`` at ``value`` inside the panel ``box`` (left, top, right, bottom)."""
    left, top, right, bottom = box
    return left + (right - left) * (k / max(1, count - 1)), bottom - (bottom - top) * (value - low) / span
