"""The drift history: ``drift.parquet`` (a row per method per run, appended by rewriting the table
whole) and a PNG plot of each method's verdicts over the windows' times.

One monitor writes an ``out_dir`` at a time (two runs appending at once could lose one's rows:
give the deployment a concurrency limit of 1). A history written before the p-values (no
``status``, ``p_value`` or ``alpha`` column) is read with those filled in from ``drifted``. The
plot is drawn with matplotlib when it is installed (supervision brings it), else with PIL.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from prefect_roboflow.blocks.exceptions import InvalidInputError

from .._storage.access import join, list_files, read_bytes, write_bytes
from .._storage.parquet import write_whole

__all__ = ["DRIFT_SCHEMA", "HISTORY_FILE", "PLOT_FILE", "append_history", "plot_history", "read_history"]

HISTORY_FILE = "drift.parquet"
PLOT_FILE = "drift.png"
DRIFT_SCHEMA = pa.schema(
    [
        ("run_at", pa.timestamp("us", tz="UTC")),
        ("flow_run_id", pa.string()),
        ("method", pa.string()),
        ("status", pa.string()),
        ("score", pa.float64()),
        ("p_value", pa.float64()),
        ("alpha", pa.float64()),
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
        if "status" not in table.schema.names:  # written before the p-values: verdicts by threshold
            drifted = table.column("drifted").to_pylist()
            table = table.append_column("status", pa.array(["drifted" if d else "no drift" for d in drifted]))
        for name in ("p_value", "alpha"):
            if name not in table.schema.names:
                table = table.append_column(name, pa.nulls(table.num_rows, pa.float64()))
        return table.select(DRIFT_SCHEMA.names).cast(DRIFT_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError, ValueError) as error:
        raise InvalidInputError("out_dir", f"{url} is not a drift history: {error}") from None


def append_history(out: str, past: pa.Table, rows: Sequence[dict[str, Any]]) -> tuple[str, pa.Table]:
    """``past`` plus ``rows``, written whole to ``out/drift.parquet``; its location and the table."""
    table = pa.concat_tables([past, pa.Table.from_pylist(list(rows), schema=DRIFT_SCHEMA)])
    buffer = io.BytesIO()
    write_whole(table, buffer)
    url = join(out, HISTORY_FILE)
    write_bytes(url, buffer.getvalue())
    return url, table


#: A point of a method's series: the window's time, its score (None: insufficient data), its status.
Point = tuple[datetime, float | None, str]
COLOURS = {"drifted": "red", "no drift": "tab:blue", "insufficient data": "grey"}


def plot_history(table: pa.Table, title: str) -> bytes:
    """A PNG: each method's score per window against the window's time (UTC), coloured by its
    verdict (red: drifted; blue: no drift; grey ticks at the bottom: insufficient data)."""
    series: dict[str, list[Point]] = {}
    for row in table.to_pylist():
        series.setdefault(row["method"], []).append((row["run_at"], row["score"], row["status"]))
    for points in series.values():
        points.sort(key=lambda p: p[0])
    try:
        return _plot_matplotlib(series, title)
    except ImportError:
        return _plot_pil(series, title)


def _plot_matplotlib(series: dict[str, list[Point]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.dates as mdates
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 2.4 * max(1, len(series))), dpi=100)
    axes = figure.subplots(max(1, len(series)), 1, squeeze=False)[:, 0]
    for ax, (method, points) in zip(axes, series.items(), strict=False):
        scored = [(t, v) for t, v, _ in points if v is not None]
        if scored:
            ax.plot(*zip(*scored, strict=True), color="lightgrey", zorder=1)
        for status, colour in COLOURS.items():
            if status == "insufficient data":
                times = [t for t, _, s in points if s == status]
                if times:
                    ax.plot(times, [0.0] * len(times), "|", color=colour, markersize=14, label=status,
                            transform=ax.get_xaxis_transform())  # fmt: skip
                continue
            chosen = [(t, v) for t, v, s in points if s == status and v is not None]
            if chosen:
                ax.scatter(*zip(*chosen, strict=True), color=colour, zorder=3, label=status, s=18)
        ax.set_title(method)
        ax.set_ylabel("score")
        locator = mdates.AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
        ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("window time (UTC)")
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _plot_pil(series: dict[str, list[Point]], title: str) -> bytes:
    from PIL import Image, ImageDraw

    width, panel = 800, 200
    image = Image.new("RGB", (width, 30 + panel * max(1, len(series))), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill="black")
    times = [t.timestamp() for points in series.values() for t, _, _ in points]
    start, span = (min(times), (max(times) - min(times)) or 1.0) if times else (0.0, 1.0)
    for i, (method, points) in enumerate(series.items()):
        box = (50, 30 + i * panel + 20, width - 20, 30 + (i + 1) * panel - 20)
        values = [v for _, v, _ in points if v is not None] or [0.0]
        low, height = min(values), (max(values) - min(values)) or 1.0
        draw.text((box[0], box[1] - 16), f"{method} (x: window time, UTC)", fill="black")
        draw.rectangle(box, outline="grey")
        for t, v, status in points:
            x = box[0] + (box[2] - box[0]) * (t.timestamp() - start) / span
            if v is None:
                draw.line((x, box[3] - 10, x, box[3]), fill="grey", width=2)
                continue
            y = box[3] - (box[3] - box[1]) * (v - low) / height
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill="red" if status == "drifted" else "blue")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
