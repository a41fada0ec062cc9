"""A server across a network (issue 29): the ``embed_images`` flow with nothing set against a bare
async httpx loop at its best fixed concurrency, through the +50 ms proxy and, beside it, on loopback.

    python -m benchmarks.remote --server URL [--n 300] [--rounds 3] [--results FILE]

Interleaved rounds (the order rotated and reversed each round, so drift on a shared machine favours
no setting), each setting keeping its best round, of:

- a bare async httpx loop (`benchmarks.clients.bare_httpx`) at 4, 8, 16 and 32 requests in flight;
- the ``embed_images`` flow as shipped (``server=URL``: the block's defaults, the adaptive limit),
  a fresh cache and a fresh HTTP engine each run (as a new worker process: its limit starts at 4);
- the same flow with the limiter as it was before issue 29 (`FastestAnswerLimiter`: no-load latency
  the fastest answer ever seen, not a round's median), side by side;

directly against the server, and through `LatencyProxy` (the tests' fault proxy in its own process,
50 ms before each forwarded request). The flow's step table gives the limit it ended at and its peak.
Target: flow ≥ 0.9× the bare loop's best through the proxy; on loopback, no worse than before.

The bare loop's best fixed concurrency is the setting with the highest median over the rounds, and
the target compares medians: the flow's against that setting's. The best single round of the bare
loop is the highest of 4 settings × ``rounds`` draws, the flow's of ``rounds``: on this shared
machine the chosen setting's best round stood 4-20% above its own median, so best against best
partly measures which side drew more often. Both ratios are in the table.

Each run's CPU is counted by process (from /proc): this client process (every thread), the Prefect
API it records to (the test harness's server process), the proxy and the inference server (its PID
file from ``deployments/inference_server/up``). On a 2-core machine they all share the cores, so a
client that spends more CPU per image leaves the server less: the CPU columns say how much of a gap
that explains. ``--pin`` puts the inference server and the proxy on the last core and the client and
its Prefect API on the others, as a server on a machine of its own would be (the server then has one
core: compare ratios within a mode, not rates across modes).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import math
import os
import statistics
import tempfile
import time
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from prefect_roboflow.blocks._limiter import AdaptiveLimiter, Slot

from .clients import bare_httpx, embed_flow, step_table
from .common import NETWORK_LATENCY, LatencyProxy, Run, Table, descendants, generate_images, process_cpu, ratio, verdict
from .gpu_speed import flow_batch_size

BARE = (4, 8, 16, 32)
FLOW_SETTING = "defaults (adaptive)"
TARGET = 0.9


class FastestAnswerLimiter(AdaptiveLimiter):
    """The limiter's estimate as it was before issue 29, for a side-by-side row: each round judged
    against the fastest answer ever seen of a kind, not the lowest round median."""

    def _sample(self, slot: Slot) -> None:
        latency = max(1e-4, self._clock() - slot.started)
        fastest = min(latency, self._fastest.setdefault(slot.key, latency))
        self._fastest[slot.key] = fastest
        super()._sample(slot)

    def _end_round(self) -> None:
        self._noload = dict(self._fastest)  # what the round is judged against: the fastest answers
        self._pool.clear()  # ... and never a round's median
        super()._end_round()
        self._noload = dict(self._fastest)

    @property
    def _fastest(self) -> dict[Hashable, float]:
        return self.__dict__.setdefault("_fastest_seen", {})


#: Side-by-side flow settings: the limiter each one runs with.
VARIANTS: dict[str, type[AdaptiveLimiter]] = {
    FLOW_SETTING: AdaptiveLimiter,
    "defaults, the limiter before issue 29": FastestAnswerLimiter,
}


@dataclass
class Processes:
    """The processes a run's CPU is counted in: this client, its Prefect API, the proxy, the server."""

    proxy: int
    server: int | None

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far, by process (the Prefect API: this process's descendants but the proxy,
        i.e. the test harness's server; NaN when PREFECT_API_URL names a server of its own)."""
        prefect = [process_cpu(pid) for pid in descendants(os.getpid()) - {self.proxy}]
        return {
            "client": time.process_time(),
            "prefect API": sum(c for c in prefect if not math.isnan(c)) if prefect else math.nan,
            "proxy": process_cpu(self.proxy),
            "server": process_cpu(self.server) if self.server is not None else math.nan,
        }


def server_pid(url: str) -> int | None:
    """The PID of the inference server ``deployments/inference_server/up`` started on the URL's port
    (its PID file, checked against the process's command line, as ``up`` checks it)."""
    port = urlsplit(url).port
    cache = os.environ.get("PREFECT_ROBOFLOW_CACHE") or os.path.expanduser("~/.cache/prefect-roboflow")
    for path in glob.glob(f"{cache}/inference-cpu-*/server-{port}.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(Path(path).read_text().strip())
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if f"{port}".encode() in command and any(b"launcher.py" in arg for arg in command):
                return pid
    return None


def _threads(pid: int) -> list[int]:
    return [int(task) for task in os.listdir(f"/proc/{pid}/task")]  # affinity is per thread


@contextlib.contextmanager
def pinned(processes: Processes) -> Iterator[str]:
    """The server and the proxy on the last core, this process and its Prefect API on the others;
    every thread's own mask back afterwards. What it did, for the tables' titles.

    Raises:
        SystemExit: when there is no server PID or one core, or a mask cannot be set.
    """
    every = os.sched_getaffinity(0)
    if processes.server is None or len(every) < 2:
        raise SystemExit("--pin needs the inference server's PID file and at least 2 cores")
    last = {max(every)}
    client = [os.getpid(), *(descendants(os.getpid()) - {processes.proxy})]
    plan = [(pid, last) for pid in (processes.server, processes.proxy)] + [(pid, every - last) for pid in client]
    saved: dict[int, set[int]] = {}  # each thread's mask before, and each process's (its main thread's)
    try:
        for pid, cpus in plan:
            saved[pid] = os.sched_getaffinity(pid)
            for thread in _threads(pid):
                try:
                    saved.setdefault(thread, os.sched_getaffinity(thread))
                    os.sched_setaffinity(thread, cpus)
                    taken = os.sched_getaffinity(thread)
                except ProcessLookupError:  # a thread that ended meanwhile
                    continue
                except OSError as exc:
                    raise SystemExit(f"--pin: thread {thread} of {pid}: {exc}") from exc
                if taken != cpus:
                    raise SystemExit(f"--pin: thread {thread} of {pid} did not take the mask {sorted(cpus)}")
        yield f"server and proxy pinned to core {max(every)}, the client to {sorted(every - last)}"
    finally:  # every thread there is now, those started while pinned included (they took the pinned mask)
        for pid, _ in plan:
            with contextlib.suppress(OSError):  # a process that has ended
                for thread in _threads(pid):
                    with contextlib.suppress(OSError):
                        os.sched_setaffinity(thread, saved.get(thread, saved.get(pid, every)))


def flow_run(url: str, images: Sequence[Path], cache: Path, setting: str = FLOW_SETTING) -> tuple[Run, str]:
    """One flow run on a fresh engine, with the limiter of ``setting`` (`VARIANTS`); the run and
    the limit its steps reported (last / peak)."""
    from prefect_roboflow.blocks import _http

    _http.close_engines()
    _http.AdaptiveLimiter = VARIANTS[setting]  # type: ignore[misc]
    limits: list[str] = []
    real = step_table

    def noted(flow_run_id, key):  # type: ignore[no-untyped-def]
        rows = real(flow_run_id, key)
        limits.extend(f"{r.get('concurrency_limit')}/{r.get('concurrency_peak')}" for r in rows)
        return rows

    from . import clients

    clients.step_table = noted  # type: ignore[assignment]
    try:
        run = embed_flow(url, images, cache, batch_size=flow_batch_size(), setting=setting)
    finally:
        clients.step_table = real  # type: ignore[assignment]
        _http.close_engines()
        _http.AdaptiveLimiter = AdaptiveLimiter  # type: ignore[misc]
    return run, ", ".join(limits)


def measure(
    url: str, images: Sequence[Path], rounds: int, work: Path, processes: Processes
) -> tuple[dict[str, list[Run]], list[str], dict[str, dict[str, list[float]]]]:
    """Every setting's runs, the flow's limits, and each setting's CPU seconds per image by process."""
    plan: list[int | str] = [*BARE, *VARIANTS]
    runs: dict[str, list[Run]] = {}
    limits: list[str] = []
    cpu: dict[str, dict[str, list[float]]] = {}
    for round_ in range(rounds):
        shift = round_ * len(plan) // rounds
        order = plan[shift:] + plan[:shift]
        for c in order[::-1] if round_ % 2 else order:
            before = processes.cpu()
            try:
                if isinstance(c, str):
                    cache = work / f"cache-{round_}-{plan.index(c)}"  # fresh for every run, a failed one's too
                    run, seen = flow_run(url, images, cache, setting=c)
                    limits.append(f"{run.setting}: {seen}")
                else:
                    run = bare_httpx(url, images, c)
            except (httpx.HTTPError, RuntimeError) as exc:  # the shared server dropping a connection: NaN
                print(f"  run failed: {type(exc).__name__}: {exc}", flush=True)
                if isinstance(c, str):
                    run = Run("embed_images flow", c, len(images), math.nan)
                else:
                    run = Run("bare httpx", f"concurrency {c}", len(images), math.nan, concurrency=c)
            after = processes.cpu()
            name = f"{run.client} {run.setting}"
            runs.setdefault(name, []).append(run)
            for process, seconds in after.items():  # a failed round's, or a negative one (a process gone): NaN
                per_image = (seconds - before[process]) / len(images)
                kept = math.nan if math.isnan(run.rate) or per_image < 0 else per_image
                cpu.setdefault(name, {}).setdefault(process, []).append(kept)
            shown = ", ".join(f"{k} {1000 * (v - before[k]) / len(images):.2f}" for k, v in after.items())
            print(f"  {name}: {run.rate:.1f} img/s; CPU ms/img: {shown}", flush=True)
    return runs, limits, cpu


def _median(runs: Sequence[Run]) -> float:
    return _nanmedian([r.rate for r in runs])


def _nanmedian(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan


def _rate(run: Run) -> float:
    return -math.inf if math.isnan(run.rate) else run.rate


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pin", action="store_true", help="the server and proxy on one core, the client on the rest")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args(argv)

    from .gpu_speed import prefect_api

    tables = []
    with prefect_api(), tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
        work = Path(tmp)
        images = generate_images(work / "images", args.n)
        with LatencyProxy(args.server, NETWORK_LATENCY) as proxy:
            embed_flow(args.server, images[:16], work / "warm-cache")  # the process's first flow run, unmeasured
            processes = Processes(proxy.pid, server_pid(args.server))
            with pinned(processes) if args.pin else contextlib.nullcontext("all on every core") as placed:
                for where, url in (("direct", args.server), (f"+{NETWORK_LATENCY * 1000:.0f} ms proxy", proxy.url)):
                    tables.append(_table(where, url, images, args.rounds, work, processes, placed))
                    print(tables[-1].text(), flush=True)
    if args.results:
        with args.results.open("a") as out:
            for table in tables:
                out.write("\n" + table.markdown() + "\n")


def _table(
    where: str, url: str, images: Sequence[Path], rounds: int, work: Path, processes: Processes, placed: str
) -> Table:
    load = os.getloadavg()[0]
    print(f"{where}:", flush=True)
    runs, limits, cpu = measure(url, images, rounds, work / where.replace(" ", "_"), processes)
    best = {name: max(rs, key=_rate) for name, rs in runs.items()}
    medians = {name: _median(rs) for name, rs in runs.items()}
    chosen = max(
        (n for n in runs if n.startswith("bare")), key=lambda n: -math.inf if math.isnan(medians[n]) else medians[n]
    )
    bare, bare_median = best[chosen], medians[chosen]
    flow_name = f"embed_images flow {FLOW_SETTING}"
    kinds = list(next(iter(cpu.values())))
    table = Table(
        f"{where}: {len(images)} distinct 320×240 PNGs, best of {rounds} interleaved rounds "
        f"(load {load:.1f} → {os.getloadavg()[0]:.1f}; {placed})",
        ["client", "setting", "img/s (best)", "median", "all rounds", "best ÷ its best", "median ÷ its median"]
        + ["round by round ÷ its, median"]
        + [f"{kind} CPU ms/img" for kind in kinds]
        + ["all CPU ms/img"],
        note=f"CPU: medians over the rounds. The flow's concurrency limit (last/peak) per run: {'; '.join(limits)}",
    )
    for name, rs in runs.items():
        r, rates = best[name], ", ".join(f"{x.rate:.1f}" for x in rs)
        ratios = (ratio(r.rate, bare.rate), ratio(medians[name], bare_median), _paired(rs, runs[chosen]))
        used = [1000 * _nanmedian(cpu[name][kind]) for kind in kinds]
        table.add(r.client, r.setting, r.rate, medians[name], rates, *ratios, *used, sum(u for u in used if u == u))
    value = ratio(medians[flow_name], bare_median)
    wanted = f"flow's median ≥ {TARGET}× the bare loop's at its best ({bare.setting})"
    table.add("target", wanted, f"{value:.2f}×", "", "", "", verdict(value >= TARGET), "", *[""] * (len(kinds) + 1))
    return table


def _paired(runs: Sequence[Run], bare: Sequence[Run]) -> float:
    """The median over rounds of a setting's rate ÷ the chosen bare setting's in the same round:
    the rounds are interleaved, so a load that drifts between rounds cancels out."""
    return _nanmedian([ratio(r.rate, b.rate) for r, b in zip(runs, bare, strict=True)])


if __name__ == "__main__":
    main()
