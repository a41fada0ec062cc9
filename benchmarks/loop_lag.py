"""The flow's event loop: the longest it is ever blocked (issue 29), for three kinds of run.

    python -m benchmarks.loop_lag [--images 10000] [--photos 24] [--video-seconds 60] [--results FILE]

An async flow's event loop runs its body between the awaits: while one callback of it runs (a task
step: the code from one ``await`` to the next), nothing else on that loop moves — the progress
artifact, the wait on the next batch, Prefect's own coroutines. `LoopProbe` times every callback
the flow's loop runs (``asyncio.events.Handle._run``, wrapped) and keeps the longest; a watchdog
thread samples the loop thread's stack while one callback has run over `SAMPLE_AFTER`, so a long
one names the code that held the loop. Against `benchmarks.gpu_stub` (a server that answers at
once: the flow runs at its own speed, the worst case for its loop), each run awaited from this
benchmark's own loop, as a worker runs a flow:

- **12 MP**: ``detect_crop_classify`` over ``--photos`` 12 MP camera photos (`benchmarks.big_photos`):
  reading, resizing, the annotated copies drawn, encoded and written;
- **video**: ``detect_crop_classify`` over a ``--video-seconds`` 1080p H.264 video
  (`benchmarks.video.make_video`) at ``video_fps=2``: decoding, sampling, tracking, the annotated
  frames and the annotated H.264 video;
- **10,000 images**: ``embed_images`` over ``--images`` 64×64 PNGs into a vector index
  (``index_path``): listing, batches, the parquet table, the index update.

Target: no callback of the flow's loop over 100 ms in any of them. Only the flow's loop is
measured: Prefect's own loops in other threads (its API client's, its events') are not the flow's.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import Table, generate_images, verdict

#: The target: the longest one callback of the flow's loop may run.
TARGET_SECONDS = 0.1
#: The watchdog samples the loop thread's stack while one callback has run longer than this.
SAMPLE_AFTER = 0.05
SAMPLE_EVERY = 0.01


@dataclass
class Blocked:
    """One long callback of the flow's loop: how long, and where the loop thread was meanwhile."""

    seconds: float
    what: str
    stacks: collections.Counter[str] = field(default_factory=collections.Counter)


class LoopProbe:
    """Times every callback of one event loop; the longest, and where the long ones spent their time."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.callbacks = 0
        self.longest: list[Blocked] = []  # the 10 longest, longest first
        self._running: tuple[float, Any, Blocked] | None = None
        self._thread_id = 0
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="loop-probe", daemon=True)
        self._original: Callable[..., Any] | None = None

    def __enter__(self) -> LoopProbe:
        self.loop = asyncio.get_running_loop()
        self._thread_id = threading.get_ident()
        original = self._original = asyncio.events.Handle._run
        probe = self

        def _run(handle: asyncio.events.Handle) -> None:
            if handle._loop is not probe.loop:  # type: ignore[attr-defined]
                return original(handle)  # type: ignore[no-any-return]
            blocked = Blocked(0.0, "")
            start = time.perf_counter()
            probe._running = (start, handle, blocked)
            try:
                return original(handle)  # type: ignore[no-any-return]
            finally:
                probe._running = None
                probe.callbacks += 1
                blocked.seconds = time.perf_counter() - start
                if len(probe.longest) < 10 or blocked.seconds > probe.longest[-1].seconds:
                    blocked.what = _describe(handle)
                    probe.longest = sorted([*probe.longest, blocked], key=lambda b: -b.seconds)[:10]

        asyncio.events.Handle._run = _run  # type: ignore[method-assign]
        self._watchdog.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._watchdog.join()
        asyncio.events.Handle._run = self._original  # type: ignore[method-assign, assignment]

    def _watch(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            running = self._running
            if running is None or time.perf_counter() - running[0] < SAMPLE_AFTER:
                continue
            frame = sys._current_frames().get(self._thread_id)
            if frame is not None:
                running[2].stacks[_where(frame)] += 1

    @property
    def worst(self) -> float:
        return self.longest[0].seconds if self.longest else 0.0

    def over(self, seconds: float) -> int:
        return sum(b.seconds > seconds for b in self.longest)

    def report(self, top: int = 5) -> str:
        lines = []
        for blocked in self.longest[:top]:
            lines.append(f"  {1000 * blocked.seconds:8.1f} ms  {blocked.what}")
            for stack, n in blocked.stacks.most_common(2):
                lines.append(f"             {n} sample(s) in: {stack}")
        return "\n".join(lines)


def _describe(handle: asyncio.events.Handle) -> str:
    callback = getattr(handle, "_callback", None)
    task = getattr(callback, "__self__", None)
    if isinstance(task, asyncio.Task):
        coro = task.get_coro()
        return f"task {getattr(coro, '__qualname__', coro)!s}"
    return repr(callback)[:120]


def _where(frame: Any) -> str:
    """Where a stack is: the innermost frames of the project's code, then the calls below the last one."""
    summary = traceback.extract_stack(frame)
    last = max((i for i, f in enumerate(summary) if "/flows/" in f.filename or "/blocks/" in f.filename), default=-1)
    ours = [f for f in summary[: last + 1] if "/flows/" in f.filename or "/blocks/" in f.filename][-2:]
    below = summary[last + 1 :] if last >= 0 else summary
    picked = [*ours, *below[:3], *(below[-2:] if len(below) > 3 else [])]
    return " > ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in picked)


@contextlib.contextmanager
def prefect_api() -> Iterator[None]:
    from .gpu_speed import prefect_api as api

    with api():
        yield


async def probed(run: Callable[[], Awaitable[Any]]) -> tuple[LoopProbe, float]:
    """``run()`` awaited on this loop, every callback of the loop timed."""
    with LoopProbe() as probe:
        started = time.perf_counter()
        await run()
        return probe, time.perf_counter() - started


def examples() -> list[dict[str, Any]]:
    from prefect_roboflow.flows.demo import example_spec

    return list(example_spec()[0])


def twelve_mp(url: str, photos: Sequence[Path], work: Path) -> Callable[[], Awaitable[Any]]:
    from prefect_roboflow.flows import detect_crop_classify

    labels = ["a photo of an apple", "a photo of a box"]

    async def run() -> Any:
        return await detect_crop_classify(
            [str(p) for p in photos],
            examples(),
            labels,
            str(work / "out-12mp"),
            server=url,
            cache_storage=str(work / "cache-12mp"),
        )

    return run


def video(url: str, clip: Path, work: Path) -> Callable[[], Awaitable[Any]]:
    from prefect_roboflow.flows import detect_crop_classify

    labels = ["a photo of an apple", "a photo of a box"]

    async def run() -> Any:
        return await detect_crop_classify(
            [str(clip)],
            examples(),
            labels,
            str(work / "out-video"),
            server=url,
            cache_storage=str(work / "cache-video"),
            video_fps=2.0,
        )

    return run


def many(url: str, folder: Path, work: Path) -> Callable[[], Awaitable[Any]]:
    from prefect_roboflow.flows import embed_images

    async def run() -> Any:
        return await embed_images(
            str(folder),
            str(work / "out-many"),
            server=url,
            cache_storage=str(work / "cache-many"),
            index_path=str(work / "index-many"),
        )

    return run


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--photos", type=int, default=24)
    parser.add_argument("--video-seconds", type=int, default=60)
    parser.add_argument("--only", default="12mp,video,many", help="a comma list of 12mp, video, many")
    parser.add_argument("--results", type=Path, default=None, help="a markdown file the table is appended to")
    args = parser.parse_args(argv)

    from .big_photos import generate_photos, photo_folder
    from .gpu_stub import StubServer
    from .video import CACHE as VIDEO_CACHE
    from .video import make_video

    kinds = args.only.split(",")
    photos = generate_photos(photo_folder(), args.photos)
    clip = make_video(VIDEO_CACHE / f"loop-lag-{args.video_seconds}s.mp4", args.video_seconds)
    folder = photo_folder().with_name("bench-loop-lag-64px")
    generate_images(folder, args.images, size=(64, 64))
    warm = photo_folder().with_name("bench-loop-lag-warm")
    generate_images(warm, 8, size=(320, 240))
    results: dict[str, tuple[LoopProbe, float]] = {}
    with prefect_api(), StubServer() as stub, tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
        work = Path(tmp)
        runs = {
            "12mp": (f"12 MP: detect_crop_classify, {len(photos)} photos", twelve_mp(stub.url, photos, work)),
            "video": (
                f"video: detect_crop_classify, {args.video_seconds} s 1080p at 2 fps",
                video(stub.url, clip, work),
            ),
            "many": (f"{args.images:,} images: embed_images + index", many(stub.url, folder, work)),
        }
        # A process's first flow runs import and start Prefect's engine and the libraries the
        # flows import when first used (supervision, PyAV): small runs pay that, unmeasured.
        asyncio.run(probed(twelve_mp(stub.url, sorted(warm.iterdir())[:2], work / "warm")))
        asyncio.run(probed(many(stub.url, warm, work / "warm")))
        for kind in kinds:
            name, run = runs[kind]
            print(f"running {name}", flush=True)
            results[name] = asyncio.run(probed(run))
            probe, seconds = results[name]
            print(f"  worst {1000 * probe.worst:.1f} ms of {probe.callbacks} callbacks in {seconds:.1f} s", flush=True)
            print(probe.report(), flush=True)
    table = Table(
        "The flow's event loop: its longest callback per run (GPU stub)",
        ["run", "wall s", "loop callbacks", "worst ms", "callbacks over 100 ms", "target ≤ 100 ms"],
    )
    for name, (probe, seconds) in results.items():
        held = verdict(probe.worst <= TARGET_SECONDS)
        table.add(name, seconds, probe.callbacks, 1000 * probe.worst, probe.over(TARGET_SECONDS), held)
    print(table.text())
    if args.results:
        with args.results.open("a") as out:
            out.write("\n" + table.markdown() + "\n")


if __name__ == "__main__":
    main()
