"""Big photos (issue 10): camera-sized files through the flow with client-side resize, against
bare httpx sending the files and inference-sdk's defaults, on loopback and through a slow link.

    python -m benchmarks.big_photos --server URL --sdk-python PATH [--photos 24] [--results FILE]

(``bash benchmarks/run.sh --only big_photos`` runs it as a section of `benchmarks.bench`.)
The photo set is generated once and kept in ``~/.cache/prefect-roboflow/bench-photos-v1``:
4000×3000 JPEGs of varied quality (2.5–4 MB), every 8th a PNG (2000×1500: a 12 MP PNG of a
noisy photo is 15 MB, over what the proxies forward), two EXIF-rotated phone photos and one
portrait in every 8.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from prefect_roboflow.blocks import Clip, InferenceServer

from .clients import bare_httpx, embed_flow, inference_sdk, timed_embed
from .common import Run, Table, ratio
from .throttle_proxy import ThrottleProxy

#: The slow link: 100 Mbit/s each way, +20 ms per round trip (10 ms each way).
LINK_MBIT = 100.0
LINK_DELAY_MS = 10.0
HTTPX_CONCURRENCY = 8
SDK_PHOTOS = 8
FAST_ROUNDS = 2
TARGETS = {"loopback": 5.0, "100 Mbit/s link": 10.0}


def photo_folder() -> Path:
    root = Path(os.environ.get("PREFECT_ROBOFLOW_CACHE", Path.home() / ".cache" / "prefect-roboflow"))
    return root / "bench-photos-v1"


def generate_photos(folder: Path, count: int) -> list[Path]:
    """``count`` distinct camera-like photos (see the module doc), made once and reused."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.images import make_photo

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        kind = seed % 8
        if kind == 3:
            name, options = f"photo-{seed:03d}.png", {"size": (2000, 1500), "fmt": "PNG"}
        elif kind in (5, 6):
            name, options = f"photo-{seed:03d}-exif.jpg", {"orientation": 6 if kind == 5 else 8}
        elif kind == 7:
            name, options = f"photo-{seed:03d}-portrait.jpg", {"size": (3000, 4000)}
        else:
            name, options = f"photo-{seed:03d}.jpg", {}
        path = folder / name
        if not path.exists():
            quality = (85, 90, 95)[seed % 3]
            data = make_photo(seed, quality=quality, **options)  # type: ignore[arg-type]
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        paths.append(path)
    return paths


def block(url: str, paths: Sequence[Path], client_resize: bool) -> tuple[Run, float]:
    """``Clip.embed_images`` over the paths; also the seconds its client-side preparation takes."""
    clip = Clip(server=InferenceServer(api_url=url), client_resize=client_resize)
    started = time.perf_counter()
    clip.prepare_images([str(p) for p in paths])
    prepare_seconds = time.perf_counter() - started
    setting = "client_resize on" if client_resize else "client_resize off (files as they are)"
    return timed_embed(clip, paths, setting), prepare_seconds


def measure(
    url: str, paths: Sequence[Path], sdk_python: str, work: Path, count_bytes: Callable[[], int] | None
) -> list[tuple[Run, float | None, float | None]]:
    """Each client once over the photos: (run, bytes sent per image, client prepare s/image).

    inference-sdk, one request at a time, runs over the first `SDK_PHOTOS` only (the same mix of
    kinds); the blocks with resize off run on loopback only (through the link they are bare httpx).
    """
    rows: list[tuple[Run, float | None, float | None]] = []
    with tempfile.TemporaryDirectory(dir=work) as cache:  # Prefect's first flow run in a process is slow
        embed_flow(url, paths[:2], Path(cache))
    before = count_bytes() if count_bytes else 0

    def sent() -> float | None:
        nonlocal before
        if count_bytes is None:
            return None
        now = count_bytes()
        per_image, before = (now - before) / len(paths), now
        return per_image

    # The fast clients run FAST_ROUNDS times, interleaved, best kept: on a shared machine one
    # slow moment of the server weighs heavily on a run of a few seconds.
    flows, blocks = [], []
    for _ in range(FAST_ROUNDS):
        with tempfile.TemporaryDirectory(dir=work) as cache:
            setting = "batch_size 64, max_concurrency 8, client_resize on"
            flows.append((embed_flow(url, paths, Path(cache), setting=setting), sent()))
        run, prepare = block(url, paths, client_resize=True)
        blocks.append((run, sent(), prepare / len(paths)))
    flow, flow_bytes = max(flows, key=lambda r: r[0].rate)
    rows.append((flow, flow_bytes, None))
    rows.append(max(blocks, key=lambda r: r[0].rate))
    if count_bytes is None:
        off, prepare_off = block(url, paths, client_resize=False)
        rows.append((off, sent(), prepare_off / len(paths)))
    rows.append((bare_httpx(url, paths, HTTPX_CONCURRENCY), sent(), None))
    sdk_paths = paths[:SDK_PHOTOS]
    sdk = inference_sdk(sdk_python, url, sdk_paths, (1,))[0]
    rows.append((sdk, None if count_bytes is None else (count_bytes() - before) / len(sdk_paths), None))
    return rows


def section(url: str, sdk_python: str, work: Path, count: int) -> tuple[list[Table], list[tuple[str, str, str, bool]]]:
    """The big-photo tables and targets: loopback first, then through the throttled link."""
    paths = generate_photos(photo_folder(), count)
    mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
    tables: list[Table] = []
    verdicts: list[tuple[str, str, str, bool]] = []
    with ThrottleProxy(url, LINK_MBIT, LINK_DELAY_MS) as link:
        places: list[tuple[str, str, Callable[[], int] | None]] = [
            ("loopback", url, None),
            ("100 Mbit/s link", link.url, link.sent_bytes),
        ]
        measured = {where: measure(target, paths, sdk_python, work, counter) for where, target, counter in places}
    sizes = {run.client + run.setting: per_image for run, per_image, _ in measured["100 Mbit/s link"]}
    files = sizes["bare httpx" + f"concurrency {HTTPX_CONCURRENCY}"]
    sizes["blocks client" + "client_resize off (files as they are)"] = files  # the files, as bare httpx sends them
    for where, rows in measured.items():
        bare = next(run for run, *_ in rows if run.client == "bare httpx")
        sdk = next(run for run, *_ in rows if run.client == "inference-sdk")
        table = Table(
            f"Big photos, {where}: {len(paths)} distinct camera photos (mean {mb:.1f} MB), CLIP ViT-B-16",
            [
                "client",
                "setting",
                "images",
                "seconds",
                "images/s",
                "× bare httpx",
                "× sdk defaults",
                "KB sent / image",
                "server s / image",
                "client prepare ms / image",
            ],
            note="Bytes are counted at the throttling proxy (the request bodies, base64 and JSON included); "
            "loopback sends the same bytes. Server s / image: the answers' `time`, summed over requests "
            "(they overlap at concurrency 8). Client prepare: `prepare_images` timed on its own (read, "
            f"check, resize on up to 4 threads). The first two rows: best of {FAST_ROUNDS} interleaved "
            "rounds. inference-sdk runs over the first "
            f"{min(SDK_PHOTOS, len(paths))} photos only (one request at a time is slow; the same mix of kinds).",
        )
        for run, _, prepare in rows:
            per_image = sizes.get(run.client + run.setting)
            table.add(
                run.client,
                run.setting,
                run.images,
                run.seconds,
                run.rate,
                ratio(run.rate, bare.rate),
                ratio(run.rate, sdk.rate),
                None if per_image is None else per_image / 1000,
                None if run.server_seconds is None else run.server_seconds / run.images,
                None if prepare is None else 1000 * prepare,
            )
        tables.append(table)
        flow = rows[0][0]
        gain = ratio(flow.rate, bare.rate)
        verdicts.append(
            (f"big photos: flow ≥ {TARGETS[where]:g}× bare httpx", where, f"{gain:.1f}×", gain >= TARGETS[where])
        )
    return tables, verdicts


def replace_section(results: Path, tables: Sequence[Table], verdicts: Sequence[tuple[str, str, str, bool]]) -> None:
    """Write the big-photo section into ``results``, replacing an earlier one up to the next
    ``## `` section (the sections after it are kept)."""
    marker = "## Big photos"
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    before, found, rest = text.partition(f"\n{marker}\n")
    after = ""
    if found and "\n## " in rest:
        after = "\n## " + rest.split("\n## ", 1)[1]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        before.rstrip("\n"),
        "",
        marker,
        "",
        f"Written by `python -m benchmarks.big_photos` (see its docstring), {when}.",
        "",
    ]
    lines += ["| target | where | measured | result |", "|---|---|---|---|"]
    lines += [f"| {t} | {w} | {m} | {'PASS' if ok else 'FAIL'} |" for t, w, m, ok in verdicts]
    for table in tables:
        lines += ["", table.markdown()]
    content = "\n".join(lines) + "\n"
    if after:
        content += "\n" + after.lstrip("\n")
    tmp = results.with_suffix(".tmp")
    tmp.write_text(content)
    tmp.replace(results)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="http://127.0.0.1:9001")
    parser.add_argument("--sdk-python", required=True, help="an interpreter that can import inference_sdk")
    parser.add_argument("--photos", type=int, default=32)
    parser.add_argument("--results", default="", help="write (or replace) the '## Big photos' section of this file")
    args = parser.parse_args(argv)
    from .bench import prefect_api

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-big-photos-") as work, prefect_api():
        tables, verdicts = section(args.server, args.sdk_python, Path(work), args.photos)
    for table in tables:
        print(table.text(), flush=True)
    for target, where, measured, ok in verdicts:
        print(f"{target} [{where}]: {measured} {'PASS' if ok else 'FAIL'}")
    print(f"[big photos: {time.monotonic() - started:.0f} s]")
    if args.results:
        replace_section(Path(args.results), tables, verdicts)
    return 0 if all(ok for *_, ok in verdicts) else 3


if __name__ == "__main__":
    sys.exit(main())
