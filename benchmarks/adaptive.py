"""The adaptive concurrency limit (issue 10) against every fixed concurrency, side by side.

    python -m benchmarks.bench --only adaptive ...        (or: bash benchmarks/run.sh --only adaptive)

For each regime, direct to the server and through the 50 ms proxy, interleaved rounds of:

- a bare async httpx loop at concurrency 1, 2, 4, 8, 16, 32 (the issue's reference: the best of them);
- the blocks' client with the limit fixed at each of those (``adaptive_concurrency=False``);
- the blocks' client with defaults: nothing set, a fresh engine each run, so the limit starts at 4
  and its ramp-up is part of the time.

Each setting keeps its best round. Targets, in both regimes: adaptive ≥ 0.95× the bare loop at its
best concurrency (the issue's), and ≥ 0.95× the best fixed setting of either client (stricter).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from prefect_roboflow.blocks import Clip, InferenceError, InferenceServer, _http
from prefect_roboflow.blocks._limiter import Signal, Slot

from .clients import bare_httpx, timed_embed
from .common import Run, Table, ratio

if TYPE_CHECKING:
    from .bench import Bench

FIXED = (1, 2, 4, 8, 16, 32)
TARGET = 0.95


def blocks_run(url: str, paths: Sequence[Path], fixed: int | None) -> tuple[Run, list[tuple[int, float]]]:
    """``Clip(...).embed_images(paths)`` on a fresh engine: adaptive (``fixed=None``, block defaults)
    or pinned at ``fixed`` in flight. Returns the run and (limit, seconds) of each answer."""
    _http.close_engines()  # every run starts cold, as a new worker process would
    server = InferenceServer(api_url=url) if fixed is None else InferenceServer(api_url=url, max_concurrency=fixed)
    if fixed is not None:
        # The block has no switch for it: register the engine it will look up, with adaptation off.
        settings = server.http_settings()
        _http._engines[settings] = _http.InferenceHTTP(replace(settings, adaptive_concurrency=False))
    clip = Clip(server=server)
    answers = _time_answers(server.engine)
    setting = "adaptive (defaults)" if fixed is None else f"fixed {fixed}"
    return timed_embed(clip, paths, setting, fixed), answers


def _time_answers(engine: _http.InferenceHTTP) -> list[tuple[int, float]]:
    """(limit, seconds in flight) of each good answer, as the engine's limiter measures them
    (`ResponseInfo.elapsed` also counts the wait for a place, and retries)."""
    limiter = engine.backends[0].limiter
    answers: list[tuple[int, float]] = []
    release = limiter.release

    def timed(slot: Slot) -> None:
        if slot.signal is Signal.OK:
            answers.append((limiter.limit, time.monotonic() - slot.started))
        release(slot)

    limiter.release = timed
    return answers


def adaptive(bench: Bench) -> None:
    """Adaptive limit vs fixed concurrency, direct and through the 50 ms proxy."""
    images = bench.images[: bench.args.adaptive_n]
    for where, url in bench.targets():
        load = os.getloadavg()[0]
        runs: dict[str, list[Run]] = {}
        limits: list[list[tuple[int, float]]] = []
        plan: list[tuple[str, int | None]] = [("bare", c) for c in FIXED]
        plan += [("blocks", c) for c in FIXED]
        plan.append(("blocks", None))
        for round_ in range(bench.args.adaptive_rounds):
            # Rotate and reverse the order each round: drift on a shared machine favours no setting.
            shift = round_ * len(plan) // bench.args.adaptive_rounds
            order = plan[shift:] + plan[:shift]
            for client, c in order[::-1] if round_ % 2 else order:
                run = _one(url, images, client, c, limits)
                runs.setdefault(f"{run.client} {run.setting}", []).append(run)
        _report(bench, where, images, runs, limits, (load, os.getloadavg()[0]))


def _one(url: str, images: Sequence[Path], client: str, c: int | None, limits: list[list[tuple[int, float]]]) -> Run:
    """One run; a run that fails (the shared server timing out) is kept as NaN, not fatal."""
    setting = f"concurrency {c}" if client == "bare" else ("adaptive (defaults)" if c is None else f"fixed {c}")
    name = "bare httpx" if client == "bare" else "blocks client"
    try:
        if client == "bare":
            assert c is not None
            return bare_httpx(url, images, c)
        run, seen = blocks_run(url, images, c)
    except (httpx.HTTPError, InferenceError, RuntimeError) as exc:
        print(f"{name} {setting}: run failed ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
        return Run(name, setting, len(images), float("nan"), concurrency=c)
    if c is None:
        limits.append(seen)
    return run


def _best(runs: Sequence[Run]) -> Run:
    ok = [r for r in runs if r.rate == r.rate]  # NaN rates are failed runs
    return max(ok, key=lambda r: r.rate) if ok else runs[0]


def _report(
    bench: Bench,
    where: str,
    images: Sequence[Path],
    runs: dict[str, list[Run]],
    limits: list[list[tuple[int, float]]],
    load: tuple[float, float],
) -> None:
    best = {key: _best(rounds) for key, rounds in runs.items()}
    median = {key: statistics.median(r.rate for r in rounds) for key, rounds in runs.items()}
    adaptive_key = "blocks client adaptive (defaults)"
    bare_key = max((k for k in best if k.startswith("bare")), key=lambda k: best[k].rate)
    fixed_key = max((k for k in best if "fixed" in k), key=lambda k: best[k].rate)
    top_key = max(bare_key, fixed_key, key=lambda k: best[k].rate)
    top = best[top_key].rate
    table = Table(
        f"Adaptive vs fixed concurrency, {where}: {len(images)} images",
        ["client", "setting", "best images/s", "× best fixed", "median images/s", "all rounds", "limit end / peak"],
        note=f"{bench.args.adaptive_rounds} interleaved rounds (order rotated and reversed each round); "
        f"load average {load[0]:.1f} before, {load[1]:.1f} after. Adaptive: `InferenceServer(api_url=...)` "
        "with nothing set, a fresh engine per run (it starts at 4); the last column is the last and the "
        "highest limit its answers saw, per round. Fixed blocks rows: the same client with the limit "
        "pinned (`HttpSettings.adaptive_concurrency=False`).",
    )
    spans = "; ".join(f"{seen[-1][0]} / {max(seen)[0]}" for seen in limits if seen)
    for key in sorted(runs, key=lambda k: (best[k].client, best[k].concurrency or 0)):
        run = best[key]
        mark = " (best)" if key in (bare_key, fixed_key) else ""
        all_rounds = ", ".join(f"{r.rate:.1f}" for r in runs[key])
        span = spans if key == adaptive_key else ""
        table.add(run.client, run.setting + mark, run.rate, ratio(run.rate, top), median[key], all_rounds, span)
    bench.show(table)
    rate = best[adaptive_key].rate
    versus_bare, versus_top = ratio(rate, best[bare_key].rate), ratio(rate, top)
    versus_median = ratio(median[adaptive_key], max(median[k] for k in median if k != adaptive_key))
    summary = Table(
        f"Adaptive ÷ best fixed, {where}",
        ["ratio", "value", "target"],
        note=f"Best bare loop: {best[bare_key].setting}; best fixed blocks client: {best[fixed_key].setting}. "
        "The best of 12 fixed settings, each its best round, is biased upwards against the one adaptive row.",
    )
    summary.add("adaptive ÷ bare httpx at its best concurrency", versus_bare, f"≥ {TARGET}")
    summary.add("adaptive ÷ best fixed, either client", versus_top, f"≥ {TARGET}")
    summary.add("same, medians of the rounds", versus_median, "")
    bench.show(summary)
    bench.judge(f"adaptive ≥ {TARGET}× bare httpx at its best", where, f"{versus_bare:.2f}×", versus_bare >= TARGET)
    bench.judge(f"adaptive ≥ {TARGET}× best fixed, either client", where, f"{versus_top:.2f}×", versus_top >= TARGET)
    bench.show(_limit_profile(where, limits))


def _limit_profile(where: str, limits: Sequence[Sequence[tuple[int, float]]]) -> Table:
    """Where the adaptive runs spent their answers: at which limit, with what latency."""
    by_limit: dict[int, list[float]] = {}
    for seen in limits:
        for limit, seconds in seen:
            by_limit.setdefault(limit, []).append(seconds)
    fastest = min((s for times in by_limit.values() for s in times), default=float("nan"))
    table = Table(
        f"Adaptive runs' profile, {where}: answers by the limit they came back under",
        ["limit", "answers", "median latency ms", "× fastest answer", "limit ÷ latency (Little), req/s"],
        note="Latency: from a request's place in flight to its answer (the limiter's own measure). "
        "Little's law: with the limit full, throughput is limit ÷ latency; where it stops rising with "
        "the limit, the server is saturated and more in flight only queue.",
    )
    for limit in sorted(by_limit):
        latency = statistics.median(by_limit[limit])
        table.add(limit, len(by_limit[limit]), 1000 * latency, ratio(latency, fastest), ratio(limit, latency))
    return table
