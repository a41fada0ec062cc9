"""Feed a GPU (issue 17): the client's own cost per image, against a server that answers at once.

    python -m benchmarks.gpu_speed [--small 2400] [--big 48] [--results FILE] [--profile-dir out/benchmarks]

The stub (`benchmarks.gpu_stub`, its own process on 127.0.0.1) answers every request at once with
a fixed vector of the right size, so what is left is the client: reading, hashing, resizing,
base64, JSON, HTTP, the cache, records and the table. Over the same images in one run:

- a bare async httpx loop (read, base64, POST, parse; 16 requests in flight);
- ``Clip.embed_images`` with ``client_resize=False`` and with the default;
- the ``embed_images`` flow, cold (a new cache folder) and warm (the same folder again);
- for 12 MP photos also the block and the flow with the resize pool on one thread
  (``PREFECT_ROBOFLOW_RESIZE_WORKERS=1``).

A flow run over 8 images comes first, unmeasured: a process's first flow run also imports and
starts Prefect's engine. Each timed flow run starts on a Prefect server that has recorded the runs
before it (`settle`); the warm figure is the median of three.

Each run reports wall img/s and this process's CPU seconds per image (``time.process_time``: every
thread of this process; the stub and the Prefect API server are other processes). The cold flow
is also profiled by `CpuSampler` (which functions hold a CPU, over every thread) into
``--profile-dir``. The images: ``--small`` photo-like 640×480 JPEGs (~30 KB: gradients, shapes and
noise, so they compress like photos) and ``--big`` 12 MP photos (`benchmarks.big_photos`), made once
and kept under ``~/.cache/prefect-roboflow``. Absolute figures on a shared machine are noise; the
ratios of one run are the result.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from prefect_roboflow.blocks import Clip, InferenceServer

from .big_photos import generate_photos, photo_folder
from .clients import bare_httpx, step_table, timed_embed
from .common import REPO, Table, descendants, process_cpu, ratio, verdict
from .gpu_stub import StubServer

BARE_CONCURRENCY = 16
SMALL_SIZE = (640, 480)
SMALL_QUALITY = 60  # ~28 KB for these photo-like images at 640×480
RESIZE_WORKERS_ENV = "PREFECT_ROBOFLOW_RESIZE_WORKERS"
TARGETS = {
    "flow cold ÷ bare (small)": 0.9,
    "block ÷ bare (small)": 1.2,
    "flow CPU/img ÷ bare CPU/img (small)": 1.25,  # at most
    "flow pool ÷ one thread (12 MP)": 1.7,
    "warm flow img/s (small)": 3000.0,
}


@dataclass
class Measured:
    """One client over one image set: wall seconds and this process's CPU seconds."""

    client: str
    images: int
    wall: float
    cpu: float
    requests: int = 0
    #: CPU seconds of this process's other children meanwhile: the Prefect server recording the runs.
    prefect_cpu: float = 0.0

    @property
    def rate(self) -> float:
        return self.images / self.wall if self.wall > 0 else float("nan")

    @property
    def cpu_per_image(self) -> float:
        return self.cpu / self.images if self.images else float("nan")

    @property
    def images_per_cpu_second(self) -> float:
        return self.images / self.cpu if self.cpu > 0 else float("nan")


def measure(client: str, images: int, stub: StubServer, run: Callable[[], object]) -> Measured:
    """Run ``run`` once, timed by the wall clock and by this process's CPU clock; count the stub's
    requests. The Prefect server has recorded the flow runs before first (`settle`)."""
    settle()
    stub.reset()
    others = children_cpu(exclude=stub.pid)
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    others = children_cpu(exclude=stub.pid) - others
    requests = sum(v for k, v in stub.stats().items() if not k.endswith(":items"))
    measured = Measured(client, images, wall, cpu, requests, others)
    print(
        f"  {client}: {measured.rate:.0f} img/s, {1000 * measured.cpu_per_image:.2f} ms CPU/img, {requests} requests",
        flush=True,
    )
    return measured


def children_cpu(exclude: int) -> float:
    """CPU seconds used so far by this process's descendants but ``exclude`` (the stub): the
    Prefect server of the test harness, which shares this machine's cores with the stub."""
    return sum(c for pid in descendants(os.getpid()) - {exclude} if (c := process_cpu(pid)) == c)  # NaN: gone


# --- images ----------------------------------------------------------------------------------


def small_photos(count: int) -> list[Path]:
    """``count`` distinct photo-like 640×480 JPEGs (~30 KB), made once and reused."""
    sys.path.insert(0, str(REPO / "tests"))
    from support.images import make_photo

    folder = photo_folder().with_name("bench-gpu-small-v1")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        path = folder / f"small-{seed:05d}.jpg"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(make_photo(100_000 + seed, size=SMALL_SIZE, quality=SMALL_QUALITY))
            tmp.replace(path)
        paths.append(path)
    return paths


# --- where the time goes: a CPU sampler over every thread -----------------------------------


class CpuSampler:
    """Samples every thread's stack every ``interval`` seconds and keeps those of the threads that
    used CPU since the last sample (each thread's own CPU clock), so idle waits do not count.

    ``self_counts``: the innermost function of a busy stack; ``total_counts``: every function on it;
    ``stacks``: the innermost `depth` frames of each busy stack.
    """

    #: Innermost frames kept per stack in `stacks`.
    depth = 8

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.self_counts: collections.Counter[str] = collections.Counter()
        self.total_counts: collections.Counter[str] = collections.Counter()
        self.stacks: collections.Counter[tuple[str, ...]] = collections.Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._clocks: dict[int, float] = {}

    @staticmethod
    def _name(frame: FrameType) -> str:
        code = frame.f_code
        path = code.co_filename
        for marker in ("site-packages/", "/wt/", "/lib/python3"):
            if marker in path:
                path = path.split(marker, 1)[1]
                break
        return f"{code.co_name} ({path}:{code.co_firstlineno})"

    def _busy(self, ident: int) -> bool:
        try:
            now = time.clock_gettime(time.pthread_getcpuclockid(ident))
        except (OSError, AttributeError):
            return False
        before = self._clocks.get(ident, now)
        self._clocks[ident] = now
        return now - before > self.interval * 0.3

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval):
            for ident, frame in sys._current_frames().items():
                if ident == me or not self._busy(ident):
                    continue
                self.samples += 1
                self.self_counts[self._name(frame)] += 1
                stack: list[str] = []
                walk: FrameType | None = frame
                while walk is not None:
                    stack.append(self._name(walk))
                    walk = walk.f_back
                self.total_counts.update(set(stack))
                self.stacks[tuple(stack[: self.depth])] += 1

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self, top: int = 30) -> str:
        """The top functions by own and by inclusive busy samples, as text."""
        lines = [f"{self.samples} busy samples every {1000 * self.interval:.0f} ms", "", "self (innermost):"]
        lines += [f"  {100 * n / max(1, self.samples):5.1f}%  {name}" for name, n in self.self_counts.most_common(top)]
        lines += ["", "inclusive (on the stack):"]
        lines += [f"  {100 * n / max(1, self.samples):5.1f}%  {name}" for name, n in self.total_counts.most_common(top)]
        lines += ["", f"top stacks (innermost {self.depth} frames, innermost first):"]
        for stack, n in self.stacks.most_common(top // 2):
            lines.append(f"  {100 * n / max(1, self.samples):5.1f}%")
            lines += [f"         {name}" for name in stack]
        return "\n".join(lines)


# --- the runs ----------------------------------------------------------------------------------


def flow_batch_size() -> int:
    """The ``embed_images`` flow's default ``batch_size``: the runs below use the flow as shipped."""
    import inspect

    from prefect_roboflow.flows import embed_images

    return int(inspect.signature(embed_images.fn).parameters["batch_size"].default)


def embed_flow(url: str, paths: Sequence[Path], cache: Path, batch_size: int | None = None) -> None:
    """One ``embed_images`` run over ``paths`` (the flow's default ``batch_size``), its cache in
    ``cache``; checked to embed every image, then the Prefect server left to record it (`settle`,
    not timed: see there). `benchmarks.clients`' ``embed_flow`` also reads the run's artifacts back
    from the API, which is not the client's cost either."""
    from prefect_roboflow.flows import embed_images

    batch_size = batch_size or flow_batch_size()
    with tempfile.TemporaryDirectory(prefix="bench-out-") as out_dir:
        state = embed_images(
            images=[str(p) for p in paths],
            out_dir=out_dir,
            server=url,
            batch_size=batch_size,
            cache_storage=str(cache),
            return_state=True,
        )
    result = state.result()
    if result.succeeded != len(paths):
        raise RuntimeError(f"embed_images: {result.failed} of {result.images} images failed")
    _last_runs.append(state.state_details.flow_run_id)


_last_runs: list[Any] = []


def task_runs(flow_run_id: Any) -> int:
    """How many task runs a finished ``embed_images`` run made: its batches (from its per-step
    table artifact: a cached rerun's batches grow, see `BatchRun`) and the assets task."""
    rows = step_table(flow_run_id, "embed-images-steps")
    return sum(int(row["batches"]) for row in rows) + 1


def settle(timeout: float = 120.0) -> None:
    """Wait until the Prefect server has recorded every task run of the flow runs made so far.

    The server records a task run's events after the client moved on (~70 ms of its CPU each, on
    the SQLite of a test harness): after a 2,400-image run it is busy for ~2 s more, and a flow run
    started meanwhile waits that long for its own creation. That is the server's cost, not the
    client's, so each timed flow run starts on a server that has caught up.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        expected: dict[Any, int] = {}
        while _last_runs:
            run_id = _last_runs[0]
            tasks = expected.setdefault(run_id, task_runs(run_id))
            done = len(
                client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
                    task_run_filter=TaskRunFilter(
                        state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.COMPLETED]))
                    ),
                )
            )
            if done >= tasks:
                _last_runs.pop(0)
            elif time.monotonic() > deadline:
                raise RuntimeError(f"the Prefect server recorded {done} of {tasks} task runs of {run_id} in {timeout}s")
            else:
                time.sleep(0.05)


@contextlib.contextmanager
def resize_workers(count: int | None) -> Iterator[None]:
    """``PREFECT_ROBOFLOW_RESIZE_WORKERS`` set to ``count`` (unset: the default) for the block."""
    before = os.environ.get(RESIZE_WORKERS_ENV)
    if count is None:
        os.environ.pop(RESIZE_WORKERS_ENV, None)
    else:
        os.environ[RESIZE_WORKERS_ENV] = str(count)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(RESIZE_WORKERS_ENV, None)
        else:
            os.environ[RESIZE_WORKERS_ENV] = before


def run_set(name: str, paths: Sequence[Path], stub: StubServer, profile_dir: Path, big: bool) -> dict[str, Measured]:
    """Every client over one image set; the cold flow also under the sampler."""
    url = stub.url
    n = len(paths)
    runs: dict[str, Measured] = {}
    print(f"{name}: {n} images, {sum(p.stat().st_size for p in paths) / n / 1024:.0f} KB each", flush=True)
    runs["bare"] = measure(
        f"bare httpx, {BARE_CONCURRENCY} in flight", n, stub, lambda: bare_httpx(url, paths, BARE_CONCURRENCY)
    )
    for resize in (False, True):
        clip = Clip(server=InferenceServer(api_url=url), client_resize=resize)
        label = "Clip.embed_images, client_resize " + ("default (on)" if resize else "off")
        runs[f"block resize {'on' if resize else 'off'}"] = measure(
            label, n, stub, lambda clip=clip, label=label: timed_embed(clip, paths, label)
        )
    if big:
        clip = Clip(server=InferenceServer(api_url=url))
        with resize_workers(1):
            runs["block, 1 resize thread"] = measure(
                "Clip.embed_images, default, 1 resize thread", n, stub, lambda: timed_embed(clip, paths, "1 thread")
            )
    # The first flow run of a process also imports and starts Prefect's engine (~1-2 s, once per
    # worker process): a run over a few other images pays it, so the runs below show the per-image cost.
    with tempfile.TemporaryDirectory(prefix="bench-gpu-cache-") as cache_dir:
        embed_flow(url, paths[: min(8, n)], Path(cache_dir))
    with tempfile.TemporaryDirectory(prefix="bench-gpu-cache-") as cache_dir:
        cache = Path(cache_dir)
        runs["flow cold"] = measure("embed_images flow, cold", n, stub, lambda: embed_flow(url, paths, cache))
        # The median of three warm runs, each on a server that has recorded the runs before.
        warm = [
            measure(f"embed_images flow, warm ({i + 1}/3)", n, stub, lambda: embed_flow(url, paths, cache))
            for i in range(3)
        ]
        median = sorted(warm, key=lambda m: m.rate)[1]
        runs["flow warm"] = Measured(
            "embed_images flow, warm (median of 3)", n, median.wall, median.cpu, median.requests
        )
    # The profile is a run of its own: the sampler's cost stays out of the figures above.
    with tempfile.TemporaryDirectory(prefix="bench-gpu-cache-") as cache_dir, CpuSampler() as sampler:
        embed_flow(url, paths, Path(cache_dir))
    profile_dir.mkdir(parents=True, exist_ok=True)
    profile = profile_dir / f"gpu_speed_profile_{name.replace('×', 'x').replace(' ', '')}.txt"
    profile.write_text(f"embed_images flow, cold, {name} ({n} images)\n{sampler.report()}\n")
    print(f"  profile of a cold flow run: {profile}", flush=True)
    if big:
        with tempfile.TemporaryDirectory(prefix="bench-gpu-cache-") as cache_dir, resize_workers(1):
            runs["flow cold, 1 resize thread"] = measure(
                "embed_images flow, cold, 1 resize thread", n, stub, lambda: embed_flow(url, paths, Path(cache_dir))
            )
    return runs


def table(name: str, runs: dict[str, Measured]) -> Table:
    bare = runs["bare"]
    out = Table(
        f"GPU stub, {name}",
        [
            "client",
            "img/s (wall)",
            "÷ bare",
            "CPU ms/img",
            "CPU ÷ bare",
            "img per CPU-s",
            "Prefect server CPU ms/img",
            "requests",
        ],
    )
    for run in runs.values():
        out.add(
            run.client,
            run.rate,
            ratio(run.rate, bare.rate),
            1000 * run.cpu_per_image,
            ratio(run.cpu_per_image, bare.cpu_per_image),
            run.images_per_cpu_second,
            1000 * run.prefect_cpu / run.images,
            run.requests,
        )
    return out


def judge(small: dict[str, Measured], big: dict[str, Measured] | None) -> Table:
    """The issue's targets against this run's figures."""
    out = Table("Targets (issue 17)", ["target", "measured", "wanted", "verdict"])
    bare = small["bare"]
    figures = {
        "flow cold ÷ bare (small)": ratio(small["flow cold"].rate, bare.rate),
        "block ÷ bare (small)": ratio(small["block resize on"].rate, bare.rate),
        "flow CPU/img ÷ bare CPU/img (small)": ratio(small["flow cold"].cpu_per_image, bare.cpu_per_image),
        "warm flow img/s (small)": small["flow warm"].rate,
    }
    if big is not None:
        figures["flow pool ÷ one thread (12 MP)"] = ratio(big["flow cold"].rate, big["flow cold, 1 resize thread"].rate)
    for name, wanted in TARGETS.items():
        if name not in figures:
            continue
        value = figures[name]
        at_most = name.startswith("flow CPU")
        ok = value <= wanted if at_most else value >= wanted
        out.add(name, value, f"{'≤' if at_most else '≥'} {wanted:g}", verdict(ok))
    return out


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """The Prefect API the flows record to: PREFECT_API_URL when set, else a throwaway test harness."""
    from .bench import prefect_api as api

    with api() as url:
        yield url


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--small", type=int, default=2400, help="640×480 photos (default 2400)")
    parser.add_argument("--big", type=int, default=48, help="12 MP photos (default 48; 0: none)")
    parser.add_argument("--results", type=Path, default=None, help="append the tables (markdown) to this file")
    parser.add_argument("--profile-dir", type=Path, default=REPO / "out" / "benchmarks")
    args = parser.parse_args(argv)

    small_paths = small_photos(args.small)
    big_paths = generate_photos(photo_folder(), args.big) if args.big else []
    load = os.getloadavg()
    with prefect_api(), StubServer() as stub:
        small = run_set("640×480", small_paths, stub, args.profile_dir, big=False)
        big = run_set("12 MP", big_paths, stub, args.profile_dir, big=True) if big_paths else None
        stub_cpu = stub.cpu_seconds()
    load_after = os.getloadavg()
    tables = [table("640×480 JPEGs (~30 KB)", small)]
    if big is not None:
        tables.append(table("12 MP photos", big))
    tables.append(judge(small, big))
    note = (
        f"{os.cpu_count()} cores; load average {load[0]:.2f} before, {load_after[0]:.2f} after; "
        f"the stub used {stub_cpu:.1f} CPU-s in all."
    )
    for t in tables:
        print(t.text())
    print(note)
    if args.results is not None:
        with args.results.open("a") as out:
            out.write("\n\n".join(t.markdown() for t in tables) + f"\n\n{note}\n")


if __name__ == "__main__":
    main()
