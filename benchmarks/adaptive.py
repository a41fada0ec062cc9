"""The adaptive concurrency limit (issue 10) against every fixed concurrency, side by side.

    python -m benchmarks.bench --only adaptive ...        (or: bash benchmarks/run.sh --only adaptive)

For each regime, direct to the server and through the 50 ms proxy, interleaved rounds of:

- a bare async httpx loop at concurrency 1, 2, 4, 8, 16, 32 (the issue's reference: the best of them);
- the blocks' client with the limit fixed at each of those (``adaptive_concurrency=False``);
- the blocks' client with defaults: nothing set, a fresh engine each run, so the limit starts at 4
  and its ramp-up is part of the time.

Each setting keeps its best round; the target is adaptive ≥ 0.95× the best fixed setting of either
client, in both regimes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from prefect_roboflow.blocks import Clip, InferenceServer, _http, record_responses

from .clients import bare_httpx
from .common import Run, Table, ratio

if TYPE_CHECKING:
    from .bench import Bench

FIXED = (1, 2, 4, 8, 16, 32)
TARGET = 0.95


def blocks_run(url: str, paths: Sequence[Path], fixed: int | None) -> tuple[Run, list[int]]:
    """``Clip(...).embed_images(paths)`` on a fresh engine: adaptive (``fixed=None``, block defaults)
    or pinned at ``fixed`` in flight. Returns the run and the limit at each answer."""
    _http.close_engines()  # every run starts cold, as a new worker process would
    server = InferenceServer(api_url=url) if fixed is None else InferenceServer(api_url=url, max_concurrency=fixed)
    if fixed is not None:
        # The block has no switch for it: register the engine it will look up, with adaptation off.
        settings = server.http_settings()
        _http._engines[settings] = _http.InferenceHTTP(replace(settings, adaptive_concurrency=False))
    clip = Clip(server=server)
    started = time.perf_counter()
    with record_responses() as infos:
        vectors = clip.embed_images([str(p) for p in paths])
    seconds = time.perf_counter() - started
    if vectors.shape[0] != len(paths):
        raise RuntimeError(f"expected {len(paths)} embeddings, got {vectors.shape[0]}")
    setting = "adaptive (defaults)" if fixed is None else f"fixed {fixed}"
    server_seconds = sum(i.server_time or 0.0 for i in infos)
    run = Run("blocks client", setting, len(paths), seconds, len(infos), server_seconds, fixed)
    return run, [i.concurrency_limit for i in infos]


def adaptive(bench: Bench) -> None:
    """Adaptive limit vs fixed concurrency, direct and through the 50 ms proxy."""
    images = bench.images[: bench.args.adaptive_n]
    for where, url in bench.targets():
        best: dict[str, Run] = {}
        rates: dict[str, list[float]] = {}
        limits: list[list[int]] = []
        for round_ in range(bench.args.adaptive_rounds):
            plan: list[tuple[str, int | None]] = [("bare", c) for c in FIXED] + [("blocks", c) for c in FIXED]
            plan.append(("blocks", None))
            if round_ % 2:
                plan.reverse()  # drift on a shared machine favours neither end of the list
            for client, c in plan:
                if client == "bare":
                    assert c is not None
                    run = bare_httpx(url, images, c)
                else:
                    run, seen = blocks_run(url, images, c)
                    if c is None:
                        limits.append(seen)
                key = f"{run.client} {run.setting}"
                rates.setdefault(key, []).append(run.rate)
                if key not in best or run.rate > best[key].rate:
                    best[key] = run
        _report(bench, where, images, best, rates, limits)


def _report(
    bench: Bench,
    where: str,
    images: Sequence[Path],
    best: dict[str, Run],
    rates: dict[str, list[float]],
    limits: list[list[int]],
) -> None:
    adaptive_run = best["blocks client adaptive (defaults)"]
    bare = max((r for r in best.values() if r.client == "bare httpx"), key=lambda r: r.rate)
    fixed = max((r for k, r in best.items() if r.client == "blocks client" and "fixed" in k), key=lambda r: r.rate)
    top = max(bare, fixed, key=lambda r: r.rate)
    table = Table(
        f"Adaptive vs fixed concurrency, {where}: {len(images)} images",
        ["client", "setting", "images/s", "× best fixed", "limit (end / peak)", "all rounds"],
        note=f"Best of {bench.args.adaptive_rounds} interleaved rounds per row (order reversed every other "
        "round). Adaptive: `InferenceServer(api_url=...)` with nothing set, a fresh engine per run (starts at "
        "4); its limit column is the last and highest limit its answers saw, per round. Fixed blocks rows: "
        "the same client with the limit pinned (`HttpSettings.adaptive_concurrency=False`).",
    )
    spans = "; ".join(f"{run[-1]} / {max(run)}" for run in limits)
    for key, run in sorted(best.items(), key=lambda kv: (kv[1].client, kv[1].concurrency or 0)):
        mark = " (best)" if run is bare or run is fixed else ""
        span = spans if run is adaptive_run else ""
        all_rounds = ", ".join(f"{r:.1f}" for r in rates[key])
        table.add(run.client, run.setting + mark, run.rate, ratio(run.rate, top.rate), span, all_rounds)
    bench.show(table)
    versus_bare, versus_top = ratio(adaptive_run.rate, bare.rate), ratio(adaptive_run.rate, top.rate)
    summary = Table(
        f"Adaptive ÷ best fixed, {where}",
        ["ratio", "value", "target"],
        note=f"Best bare loop: {bare.setting}; best fixed blocks client: {fixed.setting}.",
    )
    summary.add("adaptive ÷ bare httpx at its best concurrency", versus_bare, f"≥ {TARGET}")
    summary.add("adaptive ÷ best fixed, either client", versus_top, f"≥ {TARGET}")
    bench.show(summary)
    bench.judge(f"adaptive ≥ {TARGET}× best fixed concurrency", where, f"{versus_top:.2f}×", versus_top >= TARGET)
