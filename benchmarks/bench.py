"""The performance benchmarks of issue 5, against the real local inference server.

    python -m benchmarks.bench --server URL --sdk-python PATH [--n 500] [--only throughput,...]

(``bash benchmarks/run.sh`` sets everything up and runs this.) Each section prints a table of
figures and ratios measured side by side in this run, and the targets are judged at the end;
the whole report goes to ``--results`` (markdown). Sections:

- throughput: the ``embed_images`` flow, the blocks' client, a bare async httpx loop at its best
  concurrency, and inference-sdk (defaults and best ``max_concurrent_requests``) — direct to
  the server and through a proxy adding 50 ms per request (a server across a network);
- overhead: per-image cost of the flows beyond the server's own model time;
- cache: the same flow rerun over the same images (requests counted at a proxy);
- memory: peak RSS of ``embed_images`` at two sizes, each in a fresh process;
- concurrency: throughput against ``InferenceServer.max_concurrency``, direct and through the proxy;
- batch: the flow's ``batch_size`` through the proxy;
- adaptive: the blocks' adaptive concurrency limit against every fixed concurrency, direct and
  through the proxy (``benchmarks/adaptive.py``).
- big_photos: camera-sized photos with client-side resize, on loopback and through a 100 Mbit/s
  link (`benchmarks.big_photos`);
- latency: a signed webhook POST → the row in the output table, through serve.py, split into its
  parts; and a warm small run beside empty flows (``benchmarks/latency.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx

from .adaptive import adaptive  # noqa: F401 -- a section, called by name like the others
from .clients import bare_httpx, blocks_client, detect_flow, embed_flow, inference_sdk
from .common import (
    NETWORK_LATENCY,
    REPO,
    LatencyProxy,
    Run,
    Table,
    generate_images,
    generate_scenes,
    ratio,
    verdict,
)
from .latency import keep_section

SECTIONS = ("throughput", "overhead", "cache", "memory", "concurrency", "batch", "adaptive", "big_photos", "latency")
HTTPX_CONCURRENCY = (1, 2, 4, 8, 16)
SDK_CONCURRENCY = (2, 4, 8, 16)  # 1, the default, is measured on all images
MAX_CONCURRENCY = (1, 2, 4, 8, 16, 32)
BATCH_SIZES = (16, 32, 64, 128)
#: Exit status when the benchmark ran but a target does not hold (1 is an uncaught error).
TARGET_FAILED = 3


@dataclass
class Bench:
    """The run's inputs, scratch space, and what it found."""

    args: argparse.Namespace
    work: Path
    images: list[Path]
    stack: ExitStack
    tables: list[Table] = field(default_factory=list)
    verdicts: list[tuple[str, str, str, bool]] = field(default_factory=list)
    _caches: int = 0
    _proxy: LatencyProxy | None = None

    @property
    def url(self) -> str:
        return str(self.args.server)

    @property
    def sweep_images(self) -> list[Path]:
        return self.images[: self.args.sweep_n]

    @property
    def proxy(self) -> LatencyProxy:
        """The 50 ms proxy, started on first use and kept for the run."""
        if self._proxy is None:
            self._proxy = self.stack.enter_context(LatencyProxy(self.url, NETWORK_LATENCY))
        return self._proxy

    def targets(self) -> list[tuple[str, str]]:
        """(where, url): direct, then through the latency proxy."""
        return [("direct", self.url), (f"+{NETWORK_LATENCY * 1000:.0f} ms proxy", self.proxy.url)]

    def fresh_cache(self) -> Path:
        """A new, empty cache folder: the flow runs cold."""
        self._caches += 1
        return self.work / f"cache-{self._caches}"

    def show(self, table: Table) -> None:
        self.tables.append(table)
        print(table.text(), flush=True)

    def judge(self, target: str, where: str, measured: str, ok: bool) -> None:
        self.verdicts.append((target, where, measured, ok))


def rate_row(table: Table, run: Run, reference: float, note: str = "") -> None:
    table.add(run.client, run.setting, run.images, run.seconds, run.rate, ratio(run.rate, reference), note)


# --- sections -----------------------------------------------------------------------------


def throughput(bench: Bench) -> None:
    """(a) flow, (b) blocks client, (c) bare httpx at its best concurrency, (d) inference-sdk."""
    repeats = bench.args.repeats
    for where, url in bench.targets():
        pick = bench.images[: bench.args.pick_n]
        httpx_sweep = {c: bare_httpx(url, pick, c) for c in HTTPX_CONCURRENCY}
        httpx_c = max(httpx_sweep, key=lambda c: httpx_sweep[c].rate)
        sdk_sweep = {r.concurrency or 1: r for r in _sdk(bench, url, pick, SDK_CONCURRENCY)}
        sdk_c = max(sdk_sweep, key=lambda c: sdk_sweep[c].rate)
        # The headline runs over all N images, interleaved `repeats` times; each keeps its best.
        rounds: dict[str, list[Run]] = {}
        for _ in range(repeats):
            for run in (
                embed_flow(url, bench.images, bench.fresh_cache()),
                blocks_client(url, bench.images),
                bare_httpx(url, bench.images, httpx_c),
                *_sdk(bench, url, bench.images, (1, sdk_c)),
            ):
                rounds.setdefault(f"{run.client} {run.setting}", []).append(run)
        flow, client, bare, sdk_default, sdk_best = (max(runs, key=lambda r: r.rate) for runs in rounds.values())

        table = Table(
            f"Throughput, {where}: {len(bench.images)} distinct 320×240 PNGs",
            ["client", "setting", "images", "seconds", "images/s", "× bare httpx", "note"],
            note=f"The first five rows embed all images, best of {repeats} interleaved rounds. The sweeps, "
            f"over the first {len(pick)} images, pick the concurrency of bare httpx and of inference-sdk "
            "(its default, 1, is the row above).",
        )
        for run in (flow, client, bare, sdk_default, sdk_best):
            rate_row(table, run, bare.rate, f"all rounds: {_rates(rounds[f'{run.client} {run.setting}'])}")
        for c, run in httpx_sweep.items():
            rate_row(table, run, bare.rate, f"sweep{' (best)' if c == httpx_c else ''}")
        for c, run in sdk_sweep.items():
            rate_row(table, run, bare.rate, f"sweep{' (best)' if c == sdk_c else ''}")
        bench.show(table)

        ratios = Table(
            f"Throughput ratios, {where}",
            ["ratio", "value", "target"],
            note="(a) embed_images flow, (b) blocks client, (c) bare httpx at its best concurrency, "
            "(d) inference-sdk. Orchestration = (flow − client seconds) / image.",
        )
        a_c, b_c = ratio(flow.rate, bare.rate), ratio(client.rate, bare.rate)
        sdk_top = max(sdk_default, sdk_best, key=lambda r: r.rate)
        a_d, a_dbest = ratio(flow.rate, sdk_default.rate), ratio(flow.rate, sdk_top.rate)
        ratios.add("a/c  flow / bare httpx", a_c, "≥ 0.9")
        ratios.add("b/c  client / bare httpx", b_c, "")
        ratios.add("a/d  flow / inference-sdk defaults", a_d, "≥ 2")
        ratios.add("a/d' flow / inference-sdk best", a_dbest, "")
        ratios.add("orchestration ms/image at defaults", 1000 * (flow.seconds - client.seconds) / flow.images, "")
        bench.show(ratios)
        bench.judge("flow ≥ 0.9× bare httpx", where, f"{a_c:.2f}×", a_c >= 0.9)
        bench.judge("flow ≥ 2× inference-sdk defaults", where, f"{a_d:.2f}×", a_d >= 2.0)


def _rates(runs: Sequence[Run]) -> str:
    return ", ".join(f"{r.rate:.1f}" for r in runs)


def _sdk(bench: Bench, url: str, paths: Sequence[Path], concurrencies: Sequence[int] = SDK_CONCURRENCY) -> list[Run]:
    return inference_sdk(bench.args.sdk_python, url, paths, concurrencies)


def overhead(bench: Bench) -> None:
    """(flow wall − the server's own model time) / image, one request in flight so server times
    do not overlap; the client alone on the same images shows what is HTTP, not orchestration."""
    images = bench.sweep_images
    scenes = generate_scenes(bench.work / "scenes", bench.args.scenes)
    runs = [
        blocks_client(bench.url, images, max_concurrency=1),
        embed_flow(bench.url, images, bench.fresh_cache(), max_concurrency=1, setting="max_concurrency 1"),
        detect_flow(bench.url, scenes, bench.fresh_cache(), max_concurrency=1),
        detect_flow(bench.url, scenes, bench.fresh_cache()),
    ]
    table = Table(
        "Per-image overhead beyond the server's model time (direct)",
        ["run", "setting", "images", "wall s", "requests", "server model s", "(wall − model) ms/image"],
        note="Server model time: the response body's `time`, summed (for the flows, from their step-table "
        "artifact). With one request in flight the sum does not overlap; at max_concurrency 8 it "
        "overlaps and the difference understates the overhead. The client row is the HTTP/JSON/base64 "
        "share; flow − client is Prefect's.",
    )
    for run in runs:
        per_image = 1000 * (run.seconds - (run.server_seconds or 0.0)) / run.images
        table.add(run.client, run.setting, run.images, run.seconds, run.requests, run.server_seconds, per_image)
    client, flow = runs[0], runs[1]
    table.add(
        "embed_images − client",
        "max_concurrency 1",
        flow.images,
        flow.seconds - client.seconds,
        None,
        None,
        1000 * (flow.seconds - client.seconds) / flow.images,
    )
    bench.show(table)


def cache(bench: Bench) -> None:
    """The same flow rerun over the same images, requests counted at a 0 ms proxy; and the
    floor: a warm run over one image, i.e. what any flow run costs whatever it does."""
    with LatencyProxy(bench.url, 0.0) as counter:
        folder = bench.fresh_cache()
        cold = embed_flow(counter.url, bench.images, folder, setting="cold (empty cache)")
        cold_requests = counter.count()
        counter.clear()
        warm = embed_flow(counter.url, bench.images, folder, setting="warm (rerun, same cache)")
        warm_requests = counter.count()
        floor = embed_flow(counter.url, bench.images[:1], folder, setting="warm, 1 image (fixed cost of a run)")
    speedup = ratio(cold.seconds, warm.seconds)
    table = Table(
        "Warm cache: embed_images rerun over the same images",
        ["run", "images", "seconds", "images/s", "requests at the proxy"],
        note=f"Warm minus the fixed cost: {1000 * (warm.seconds - floor.seconds) / warm.images:.2f} ms/image. "
        f"A 20× speed-up needs a cold run ≥ 20 × {floor.seconds:.2f} s = {20 * floor.seconds:.0f} s.",
    )
    table.add(cold.setting, cold.images, cold.seconds, cold.rate, cold_requests)
    table.add(warm.setting, warm.images, warm.seconds, warm.rate, warm_requests)
    table.add(floor.setting, floor.images, floor.seconds, None, None)
    table.add("speed-up cold / warm", None, speedup, None, None)
    bench.show(table)
    bench.judge("warm rerun sends 0 requests", "via counting proxy", str(warm_requests), warm_requests == 0)
    bench.judge("warm rerun ≥ 20× faster than cold", "via counting proxy", f"{speedup:.1f}×", speedup >= 20)


def memory(bench: Bench) -> None:
    """Peak RSS of embed_images at each size, in a fresh process each (64×64 PNGs, direct)."""
    sizes = sorted(bench.args.memory_sizes)
    source = bench.work / "memory-images"
    paths = generate_images(source, sizes[-1], size=(64, 64), first_seed=1_000_000)
    table = Table(
        "Memory: peak RSS of embed_images (fresh process per size)",
        ["images", "seconds", "images/s", "RSS after imports MB", "peak RSS MB", "peak − start MB", "end RSS MB"],
    )
    results = {}
    for size in sizes:
        folder = bench.work / f"memory-{size}"
        folder.mkdir(exist_ok=True)
        for path in paths[:size]:
            target = folder / path.name
            if not target.exists():
                os.link(path, target)
        figures = _memory_worker(folder, bench.url, bench.fresh_cache())
        results[size] = figures
        table.add(
            figures["images"],
            figures["seconds"],
            figures["images"] / figures["seconds"],
            figures["start_rss_mb"],
            figures["peak_rss_mb"],
            figures["peak_rss_mb"] - figures["start_rss_mb"],
            figures["end_rss_mb"],
        )
        shutil.rmtree(folder)
    shutil.rmtree(source)
    small, large = results[sizes[0]], results[sizes[-1]]
    peak_ratio = ratio(large["peak_rss_mb"], small["peak_rss_mb"])
    growth = large["peak_rss_mb"] - small["peak_rss_mb"]
    per_k = 1000 * growth / (sizes[-1] - sizes[0]) if sizes[-1] > sizes[0] else float("nan")
    table.add(f"ratio {sizes[-1]} / {sizes[0]}", None, None, None, peak_ratio, None, None)
    table.note = f"Peak grows {growth:.1f} MB from {sizes[0]} to {sizes[-1]} images ({per_k:.2f} MB per 1,000 images)."
    bench.show(table)
    (bench.work / "memory-samples.json").write_text(json.dumps({str(k): v["samples"] for k, v in results.items()}))
    bench.judge(f"peak RSS at {sizes[-1]} ≤ 1.2× at {sizes[0]}", "direct", f"{peak_ratio:.2f}×", peak_ratio <= 1.2)


def _memory_worker(folder: Path, url: str, cache_dir: Path) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_worker", str(folder), url, str(cache_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if done.returncode != 0:
        raise RuntimeError(f"memory_worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    sys.stderr.write(done.stderr)
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def concurrency(bench: Bench) -> None:
    """Client and flow throughput against InferenceServer.max_concurrency."""
    images = bench.sweep_images
    for where, url in bench.targets():
        table = Table(
            f"Concurrency sweep, {where}: {len(images)} images",
            ["max_concurrency", "client images/s", "flow images/s", "flow / client"],
            note="Default today: adaptive, capped at max_concurrency 64 (this sweep sets that cap).",
        )
        for c in MAX_CONCURRENCY:
            client = blocks_client(url, images, max_concurrency=c)
            flow = embed_flow(url, images, bench.fresh_cache(), max_concurrency=c)
            table.add(c, client.rate, flow.rate, ratio(flow.rate, client.rate))
        bench.show(table)


def batch(bench: Bench) -> None:
    """embed_images throughput against batch_size (images per task run), through the proxy."""
    where, url = bench.targets()[1]
    table = Table(
        f"batch_size sweep, {where}: {len(bench.images)} images",
        ["batch_size", "task runs", "seconds", "images/s"],
        note="The flows' default today: batch_size 128.",
    )
    for size in BATCH_SIZES:
        run = embed_flow(url, bench.images, bench.fresh_cache(), batch_size=size)
        table.add(size, -(-run.images // size), run.seconds, run.rate)
    bench.show(table)


def big_photos(bench: Bench) -> None:
    """Camera-sized photos: the flow with client-side resize against bare httpx and inference-sdk."""
    from .big_photos import section

    tables, verdicts = section(bench.url, bench.args.sdk_python, bench.work, bench.args.photos)
    for table in tables:
        bench.show(table)
    for verdict_row in verdicts:
        bench.judge(*verdict_row)


def latency(bench: Bench) -> None:
    """Webhook → row through serve.py, and the warm small run (their own Prefect server)."""
    from . import latency as webhook_latency

    tables, verdicts = webhook_latency.measure(bench.url, bench.args.latency_n)
    for table in tables:
        bench.show(table)
    for verdict_row in verdicts:
        bench.judge(*verdict_row)


# --- set-up and report ------------------------------------------------------------------------


@contextmanager
def prefect_api() -> Iterator[str]:
    """A throwaway Prefect API (unless PREFECT_API_URL is set), shared with child processes."""
    from prefect.settings import PREFECT_API_URL

    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        api_url = str(PREFECT_API_URL.value())
        os.environ["PREFECT_API_URL"] = api_url
        try:
            yield api_url
        finally:
            del os.environ["PREFECT_API_URL"]


def machine(args: argparse.Namespace) -> list[str]:
    """Where and how the figures were made."""
    server = httpx.get(f"{args.server}/info", timeout=10).json()
    sdk_version = subprocess.run(
        [args.sdk_python, "-c", "import inference_sdk; print(inference_sdk.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return [
        f"- command: `{args.command}`",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {len(os.sched_getaffinity(0))} CPUs (`nproc`), {platform.machine()}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}",
        f"- server: {server.get('name')} {server.get('version')} on 127.0.0.1 (placeholder weights), "
        f"sharing the CPUs with the clients; inference-sdk {sdk_version or '?'}",
        f"- sizes: N={args.n} images ({args.repeats} rounds; throughput sweeps over {args.pick_n}, "
        f"other sweeps over {args.sweep_n}), {args.scenes} scenes, "
        f"memory at {', '.join(map(str, args.memory_sizes))} images",
    ]


def write_results(bench: Bench, header: Sequence[str], minutes: float) -> None:
    lines = ["# Benchmark results", "", "Written by `benchmarks/bench.py`; see `benchmarks/README.md`.", ""]
    lines += [*header, f"- run time: {minutes:.1f} min", "", "## Targets", ""]
    lines += ["| target | where | measured | result |", "|---|---|---|---|"]
    lines += [f"| {t} | {w} | {m} | {verdict(ok)} |" for t, w, m, ok in bench.verdicts]
    lines += ["", "## Figures", ""]
    for table in bench.tables:
        lines += [table.markdown(), ""]
    results = Path(bench.args.results)
    if "latency" not in bench.args.only and results.exists():  # a section `python -m benchmarks.latency` wrote
        lines.append(keep_section(results.read_text()))
    results.write_text("\n".join(lines))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="http://127.0.0.1:9001", help="inference server URL")
    parser.add_argument("--sdk-python", required=True, help="an interpreter that can import inference_sdk")
    parser.add_argument("--n", type=int, default=500, help="images for throughput and cache runs")
    parser.add_argument("--pick-n", type=int, default=100, help="images per point of the throughput sweeps")
    parser.add_argument("--sweep-n", type=int, default=200, help="images per point of the other sweeps")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds of the throughput runs")
    parser.add_argument("--scenes", type=int, default=32, help="scenes for detect_crop_classify")
    parser.add_argument("--adaptive-n", type=int, default=100, help="images per run of the adaptive section")
    parser.add_argument("--adaptive-rounds", type=int, default=3, help="interleaved rounds of the adaptive section")
    parser.add_argument("--photos", type=int, default=32, help="camera photos for big_photos")
    parser.add_argument("--latency-n", type=int, default=20, help="webhook deliveries of the latency section")
    parser.add_argument(
        "--memory-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 10000], help="e.g. 1000,10000"
    )
    parser.add_argument("--only", type=lambda s: s.split(","), default=list(SECTIONS), help=",".join(SECTIONS))
    parser.add_argument("--results", default="", help="write the markdown report here")
    parser.add_argument("--command", default="python -m benchmarks.bench", help="recorded in the report")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args(argv)
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    args.sweep_n = min(args.sweep_n, args.n)
    args.pick_n = min(args.pick_n, args.n)
    args.adaptive_n = min(args.adaptive_n, args.n)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    header = machine(args)
    print("\n".join(header), flush=True)
    work = Path(tempfile.mkdtemp(prefix="prefect-roboflow-bench-"))
    try:
        harness = prefect_api() if set(args.only) - {"latency"} else nullcontext()  # latency starts its own
        with ExitStack() as stack, harness:
            images = generate_images(work / "images", args.n)
            bench = Bench(args=args, work=work, images=images, stack=stack)
            bare_httpx(args.server, images[:4], 1)  # the model is loaded before anything is timed
            for name in SECTIONS:
                if name in args.only:
                    section_started = time.monotonic()
                    globals()[name](bench)
                    print(f"[{name}: {time.monotonic() - section_started:.0f} s]", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    minutes = (time.monotonic() - started) / 60
    verdicts = Table("Targets", ["target", "where", "measured", "result"])
    for target, where, measured, ok in bench.verdicts:
        verdicts.add(target, where, measured, verdict(ok))
    print(verdicts.text(), f"\n[total {minutes:.1f} min]", flush=True)
    if args.results:
        write_results(bench, header, minutes)
    return 0 if all(ok for *_, ok in bench.verdicts) else TARGET_FAILED


if __name__ == "__main__":
    sys.exit(main())
