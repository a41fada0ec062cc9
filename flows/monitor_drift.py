"""`monitor_drift`: has a window of new images drifted from a reference? Tested on their embeddings.

The current window is a table, a vector index, or images (a folder, glob, bucket prefix or list,
embedded through the cache, as `embed_images` does); the reference is a table, an index, images,
or — by default — the latest baseline pinned for the same model and version by an earlier run with
``save_baseline=True``. Each method (`_drift.methods`: a domain classifier and the mean
embeddings' cosine distance by default, the share of drifted components, MMD) gives a score and
a p-value from a permutation null of its statistic (the score itself, except the classifier's: its
score is the out-of-fold ROC AUC, its statistic the gap between current and reference rows' mean
out-of-fold prediction); with k methods each is tested at ``alpha / k``, and a window is drifted
when a method's p-value is at most that (and its score passes its optional floor): on windows
of independent rows from the reference's distribution a run alarms on at most ``alpha`` of them.
Rows in bursts of near-copies (consecutive video frames, shots of one scene) are not independent:
the relabellings then understate the null and the run alarms far more often; give it one row per
scene. A window under `MIN_ROWS` rows gets "insufficient data", never a verdict, and is never
pinned as the baseline. A row per method goes into ``drift.parquet``, the
verdicts into a markdown artifact with a plot of the past windows over time (``drift.png``), and a
drifted window emits ``prefect_roboflow.drift.detected`` for automations (notify, or label the
window with `auto_label`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
from prefect import get_run_logger
from prefect.events import emit_event
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from prefect_roboflow.blocks.exceptions import InvalidInputError

from . import steps
from ._drift.baseline import latest_baseline, save_baseline
from ._drift.history import PLOT_FILE, append_history, plot_history, read_history
from ._drift.methods import ALPHA, DEFAULT_METHODS, MIN_ROWS, PERMUTATIONS, drift_test
from ._drift.windows import Window, check_same, checked_vectors, read_window
from ._outputs.assets import assets_section, materialize_outputs
from ._outputs.files import show_location
from ._run.artifacts import markdown_table, publish_summary
from ._run.batch import BatchRun
from ._run.events import EVENT_PREFIX, emit_completed
from ._run.flow import roboflow_flow
from ._run.parameters import resolve_out_dir
from ._run.totals import check_failure_rate
from ._steps.cache import resolve_cache
from ._steps.models import EmbeddingFamily, embedding_model, resolve_server
from ._steps.sources import ImageSource
from ._storage.access import join
from ._storage.publish import write_output

__all__ = ["DRIFT_EVENT", "DriftScore", "DriftStatus", "MonitorDriftResult", "monitor_drift"]

FLOW_KEY = "monitor-drift"
DRIFT_EVENT = f"{EVENT_PREFIX}.drift.detected"


#: A window's verdict: by a method (``drifted``, ``no drift``, ``insufficient data``) or the run's
#: (the same, or ``baseline pinned`` for a run that had no reference and only pinned the window).
DriftStatus = Literal["drifted", "no drift", "insufficient data", "baseline pinned"]
INSUFFICIENT: Literal["insufficient data"] = "insufficient data"


class DriftScore(BaseModel):
    """One method's verdict: its score (what a threshold compares; the domain classifier's ROC AUC),
    the permutation p-value of its statistic (the score itself, except the classifier's: the gap
    in mean out-of-fold prediction), and the rule."""

    method: str
    status: DriftStatus
    score: float | None
    p_value: float | None
    alpha: float
    threshold: float | None
    drifted: bool


class MonitorDriftResult(BaseModel):
    """What a `monitor_drift` run compared, its verdicts and where it wrote."""

    status: DriftStatus
    drifted: bool
    scores: list[DriftScore]
    model: str
    version: str
    n_reference: int
    n_current: int
    min_rows: int
    reference: str | None
    drift_path: str | None
    plot_path: str | None
    baseline_path: str | None = None
    warnings: list[str] = Field(default_factory=list)  # e.g. a baseline that was asked for and not pinned


def _floors(methods: Sequence[str], thresholds: dict[str, float] | None) -> dict[str, float | None]:
    """Each method's effect-size floor (None: the p-value alone decides); the contract checked them."""
    given = dict(thresholds or {})
    return {m: (float(given[m]) if m in given else None) for m in methods}


def _shown(spec: ImageSource | None) -> str:
    if spec is None or isinstance(spec, str):
        return str(spec)
    return f"{len(spec)} image reference(s)" if len(spec) != 1 else str(spec[0])


async def _embed_window(
    images: ImageSource, field: str, embedder: Any, cache: Any, batch_size: int, max_failure_rate: float
) -> Window:
    """The images of ``images`` embedded (through the cache) as a window."""
    description = f"Embedding the {field} window with {embedder.label}"
    try:
        run = await BatchRun.listed(FLOW_KEY, images, batch_size, description)  # the window's one listing
    except InvalidInputError as error:
        if not error.field.startswith("images"):
            raise
        raise InvalidInputError(field, error.reason) from None
    vectors: list[np.ndarray] = []
    frames = 0
    async for batch in run.process(lambda batch: steps.embed.submit(embedder, batch, cache)):
        vectors.extend(np.asarray(r.embedding, dtype=np.float32) for r in batch.records if r.ok)
        frames += sum(r.ok and r.frame_index is not None for r in batch.records)
    check_failure_rate(run.images_failed, run.images, max_failure_rate)
    matrix = np.vstack(vectors) if vectors else np.empty((0, 0), np.float32)
    shown = _shown(images)
    return Window(checked_vectors(matrix, field, shown), embedder.family, embedder.version, shown, frames)


@roboflow_flow(name="monitor-drift", flow_run_name="monitor-drift[{model}]", validate_parameters=True)
async def monitor_drift(
    current: ImageSource,
    out_dir: str,
    reference: str | list[str] | None = None,
    methods: list[str] = list(DEFAULT_METHODS),  # noqa: B006 - a flow parameter's shown default; never mutated
    alpha: float = ALPHA,
    thresholds: dict[str, float] | None = None,
    permutations: int = PERMUTATIONS,
    save_baseline: bool = False,
    baseline_dir: str | None = None,
    server: str | list[str] | None = None,
    model: EmbeddingFamily = "clip",
    version: str | None = None,
    batch_size: int = 128,
    cache_storage: str | None = None,
    seed: int = 0,
    max_failure_rate: float = 0.5,
) -> MonitorDriftResult:
    """Test whether the ``current`` window's embeddings have drifted from a reference.

    Args:
        current: The new window: an embeddings table (``….parquet``, or a folder of parts), a vector
            index folder, or images (a folder, glob, bucket prefix, ``block://`` location or list).
        out_dir: Folder or bucket location for ``drift.parquet`` (the history) and ``drift.png``.
        reference: What the window is compared with: a table, an index or images; by default the
            latest baseline pinned for the current window's model and version under ``baseline_dir``.
        methods: Some of ``"domain_classifier"`` (a ridge classifier; score: its out-of-fold ROC AUC),
            ``"mean_cosine"`` (the two by default), ``"share_drifted"`` (share of components whose
            KS test gives p < 0.05), ``"mmd"``; see `prefect_roboflow.flows._drift.methods`.
        alpha: The run's false-alarm rate at most: on windows from the reference's own
            distribution it reports drift on at most this share of them. Each of the k methods
            finds drift when its permutation p-value is at most ``alpha / k``.
        thresholds: Optional effect-size floors, for "only large drift": a method finds drift
            only when its score is also above its floor, e.g. ``{"domain_classifier": 0.6}``
            (Evidently's fixed thresholds were AUC 0.55, cosine distance 0.2, share 0.2, MMD 0.015).
        permutations: Relabellings of the pooled rows per test (p-values on a grid of
            ``1 / (permutations + 1)``; at least ``1 / alpha - 1``).
        save_baseline: Pin the current window as the newest baseline of its model and version
            after scoring it (with no reference yet, the run only pins it).
        baseline_dir: Where baselines live (``<family>/<version>/<UTC time>.parquet``);
            ``out_dir/baselines`` by default.
        server, model, version, batch_size, cache_storage: How images are embedded (see
            `embed_images`); a table's or index's own model is used as it is, and must match.
        seed: Seeds the methods' subsamples, folds and permutations: the same windows give the same verdicts.
        max_failure_rate: The run fails, before scoring, above this share of images that failed to embed.

    Returns:
        The run's status (``drifted`` when any method finds drift; ``insufficient data`` when a
        window has fewer than `MIN_ROWS` rows; ``baseline pinned`` when there was nothing to
        compare with yet), each method's verdict, the window sizes and the outputs.

    Raises:
        InvalidInputError: naming the parameter, before anything is written: an empty window, NaN
            or infinite values, no baseline to compare with, or a reference of another model,
            version or dimension than the current window (checked before any image is embedded).
    """
    floors = _floors(methods, thresholds)
    out = resolve_out_dir(out_dir)
    baselines = baseline_dir or join(out, "baselines")
    embedder = None
    cache = resolve_cache(cache_storage)
    current_window = await asyncio.to_thread(read_window, current, "current")  # off the flow's event loop
    if current_window is None:
        embedder = embedding_model(model, version, resolve_server(server))
    identity = (
        (current_window.family, current_window.version, current_window.dim)
        if current_window
        else (str(embedder.family), str(embedder.version), None)  # type: ignore[union-attr]
    )
    reference_spec: ImageSource | None = reference
    if reference_spec is None:
        reference_spec = await asyncio.to_thread(latest_baseline, baselines, identity[0], identity[1])
        if reference_spec is None and not save_baseline:
            raise InvalidInputError(
                "reference",
                f"none given and no baseline pinned for {identity[0]} {identity[1]} under {baselines}; "
                "run once with save_baseline=True",
            )
    reference_window = (
        None if reference_spec is None else await asyncio.to_thread(read_window, reference_spec, "reference")
    )
    if reference_window is not None:
        check_same(
            (reference_window.family, reference_window.version, reference_window.dim), identity, _shown(reference_spec)
        )
    elif reference_spec is not None:  # reference images, embedded with the current window's model
        if current_window is not None:
            embedder = embedding_model(current_window.family, current_window.version, resolve_server(server))
        reference_window = await _embed_window(
            reference_spec, "reference", embedder, cache, batch_size, max_failure_rate
        )
    if current_window is None:
        current_window = await _embed_window(current, "current", embedder, cache, batch_size, max_failure_rate)
    if reference_window is not None:
        check_same(
            (reference_window.family, reference_window.version, reference_window.dim),
            (current_window.family, current_window.version, current_window.dim),
            _shown(reference_spec),
        )
    return await _score_and_write(
        current_window, reference_window, current, out, baselines, floors, (alpha, permutations, seed), save_baseline
    )


def _verdicts(
    reference: Window, current: Window, floors: dict[str, float | None], alpha: float, permutations: int, seed: int
) -> list[DriftScore]:
    """Each method's verdict; "insufficient data" for all when a window is under `MIN_ROWS` rows."""
    if min(len(reference.vectors), len(current.vectors)) < MIN_ROWS:
        return [
            DriftScore(method=m, status=INSUFFICIENT, score=None, p_value=None, alpha=alpha, threshold=f, drifted=False)
            for m, f in floors.items()
        ]
    verdicts = []
    each = alpha / len(floors)  # Bonferroni: the run's false alarms stay at most alpha
    for method, floor in floors.items():
        test = drift_test(method, reference.vectors, current.vectors, permutations=permutations, seed=seed)
        drifted = test.p_value <= each and (floor is None or test.score > floor)
        verdicts.append(
            DriftScore(
                method=method,
                status="drifted" if drifted else "no drift",
                score=test.score,
                p_value=test.p_value,
                alpha=each,
                threshold=floor,
                drifted=drifted,
            )
        )
    return verdicts


def _test_and_write(
    current_window: Window,
    reference_window: Window | None,
    out: str,
    baselines: str,
    floors: dict[str, float | None],
    rule: tuple[float, int, int],
    pin: bool,
    run_id: str,
) -> tuple[list[DriftScore], str | None, str | None, str | None]:
    """The verdicts, the history and plot they go into, and the pinned baseline (if ``pin``)."""
    scores = [] if reference_window is None else _verdicts(reference_window, current_window, floors, *rule)
    drift_path = plot_path = None
    if scores:
        assert reference_window is not None
        past = read_history(out)
        now = datetime.now(timezone.utc)
        rows = [
            {
                **s.model_dump(),
                "run_at": now,
                "flow_run_id": run_id,
                "n_reference": len(reference_window.vectors),
                "n_current": len(current_window.vectors),
                "model": current_window.family,
                "version": current_window.version,
                "reference": reference_window.source,
                "current": current_window.source,
            }
            for s in scores
        ]
        drift_path, history = append_history(out, past, rows)
        plot_path = join(out, PLOT_FILE)
        write_output(
            plot_path, plot_history(history, f"Embedding drift of {current_window.family} {current_window.version}")
        )
    # a window too small for a verdict would be too small a reference for every later run
    baseline_path = save_baseline(current_window, baselines) if pin and _can_pin(current_window) else None
    return scores, drift_path, plot_path, baseline_path


def _can_pin(window: Window) -> bool:
    """Whether ``window`` may become the baseline: at least `MIN_ROWS` rows."""
    return len(window.vectors) >= MIN_ROWS


def _not_pinned(window: Window) -> str:
    return (
        f"Baseline not pinned: this window has {len(window.vectors)} rows, under the {MIN_ROWS} a verdict "
        "needs; later runs keep comparing with the previous baseline"
    )


async def _score_and_write(
    current_window: Window,
    reference_window: Window | None,
    current: ImageSource,
    out: str,
    baselines: str,
    floors: dict[str, float | None],
    rule: tuple[float, int, int],
    pin: bool,
) -> MonitorDriftResult:
    """Test, then write: the history and plot, the baseline (on a worker thread: seconds of CPU and
    storage that the flow's event loop must not wait on), then the artifact and the events."""
    scores, drift_path, plot_path, baseline_path = await asyncio.to_thread(
        _test_and_write,
        current_window,
        reference_window,
        out,
        baselines,
        floors,
        rule,
        pin,
        str(flow_run.get_id() or ""),
    )
    warnings = [_not_pinned(current_window)] if pin and not _can_pin(current_window) else []
    for side, window in (("current", current_window), ("reference", reference_window)):
        if window is not None and window.frames > 1:
            warnings.append(
                f"{window.frames} of the {side} window's {len(window.vectors)} rows are video frames: frames "
                "close in time are near-copies, and the p-values assume independent rows (too many false "
                "alarms otherwise); keep about one frame per scene (video_sample='scene' or a low video_fps)"
            )
    for warning in warnings:
        get_run_logger().warning(warning)
    status: DriftStatus
    if not scores and baseline_path is None:
        status = INSUFFICIENT  # only asked to pin, and the window was too small for it
    elif not scores:
        status = "baseline pinned"
    elif scores[0].status == INSUFFICIENT:
        status = INSUFFICIENT
    else:
        status = "drifted" if any(s.drifted for s in scores) else "no drift"
    result = MonitorDriftResult(
        status=status,
        drifted=status == "drifted",
        scores=scores,
        model=current_window.family,
        version=current_window.version,
        n_reference=0 if reference_window is None else len(reference_window.vectors),
        n_current=len(current_window.vectors),
        min_rows=MIN_ROWS,
        reference=None if reference_window is None else reference_window.source,
        drift_path=drift_path,
        plot_path=plot_path,
        baseline_path=baseline_path,
        warnings=warnings,
    )
    await _publish(result, current)
    return result


async def _publish(result: MonitorDriftResult, current: ImageSource) -> None:
    """The summary artifact, the drift event (only for a drifted window) and the completion event."""
    sizes = f"{result.n_current} current vs {result.n_reference} reference embeddings"
    if result.status == "baseline pinned":
        title = (
            f"Baseline pinned only: {result.n_current} embeddings ({result.model} {result.version}); "
            "no reference yet, nothing tested"
        )
    elif result.status == INSUFFICIENT:
        title = (
            f"Insufficient data: {sizes} ({result.model} {result.version}); "
            f"a verdict needs at least {result.min_rows} rows a side"
        )
    else:
        verdict = "DRIFTED" if result.drifted else "no drift"
        title = f"{verdict}: {sizes} ({result.model} {result.version})"
    sections = ["## Warnings\n\n" + "".join(f"- {w}\n" for w in result.warnings)] if result.warnings else []
    if result.scores:
        columns = ["method", "status", "score", "p_value", "alpha", "threshold"]
        sections.append(markdown_table([s.model_dump() for s in result.scores], columns))
        sections.append(
            "A method finds drift when its permutation p-value is at most its alpha (the run's alpha "
            "shared among its methods) and its score passes the threshold, when one is set. The "
            "domain classifier's score is its out-of-fold ROC AUC; its p-value is that of the gap "
            "between current and reference rows' mean out-of-fold prediction."
        )
        sections.append(f"Reference: `{result.reference}`; history: {show_location(str(result.drift_path))}")
        sections.append(f"Windows over time: {show_location(str(result.plot_path))}")
    if result.baseline_path:
        sections.append(f"Baseline pinned: {show_location(result.baseline_path)}")
    written = [p for p in (result.drift_path, result.plot_path, result.baseline_path) if p]
    figures = {
        "rows": len(result.scores),
        "failed": 0,
        "n_current": result.n_current,
        "n_reference": result.n_reference,
    }
    keys = await materialize_outputs(FLOW_KEY, written, current, figures, [f"{result.model} {result.version}"])
    if keys:
        sections.append(assets_section(keys))
    await publish_summary(FLOW_KEY, title, sections)
    payload = {**result.model_dump(mode="json"), "current": current}
    if result.status == "drifted":
        run_id = flow_run.get_id() or "unknown"
        emit_event(
            event=DRIFT_EVENT,
            resource={
                "prefect.resource.id": f"{EVENT_PREFIX}.drift.{result.model}.{result.version}",
                "prefect.resource.name": FLOW_KEY,
                "prefect_roboflow.flow-run": str(run_id),
            },
            payload=payload,
        )
    emit_completed(FLOW_KEY, payload)
