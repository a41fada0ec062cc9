"""Images in a bucket vs the same images in a local folder (issue 11): `embed_images` throughput.

    python -m benchmarks.s3_source --server URL [--images 96] [--photos 12] [--rounds 2] [--results FILE]

The bucket is moto's standalone S3 server on loopback (started and stopped here), so this measures
what the flow adds to read from an S3 API — listing pages, one GET per image in the task, hashing —
not a real network's bandwidth. Two sets: small 320×240 PNGs (per-object overhead dominates) and
12 MP camera JPEGs (bytes dominate; client-side resize on). For each, interleaved rounds of:

- cold: a fresh content cache, so every image is read, hashed, resized and sent to the server;
- warm: the cache already full, so the run is reading and hashing only (and the flow's own cost):
  the part of a run the source decides.

Ratios are local ÷ S3 throughput measured side by side (best round of each).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .big_photos import generate_photos, photo_folder
from .clients import embed_flow
from .common import Run, Table, generate_images, ratio

if TYPE_CHECKING:
    from support.s3 import MotoServer


def _upload(server: MotoServer, bucket: str, paths: list[Path]) -> str:
    """The files as objects under ``s3://bucket/set/``; that prefix."""
    import boto3
    from support.s3 import ACCESS_KEY, REGION, SECRET_KEY

    client = boto3.session.Session().client(
        "s3", endpoint_url=server.endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )  # fmt: skip
    client.create_bucket(Bucket=bucket)
    for path in paths:
        client.upload_file(str(path), bucket, f"set/{path.name}")
    return f"s3://{bucket}/set/"


def _rounds(url: str, sources: dict[str, str], rounds: int, work: Path) -> dict[tuple[str, str], Run]:
    """Best cold and warm run of the flow over each source, rounds interleaved."""
    best: dict[tuple[str, str], Run] = {}
    for round_ in range(rounds):
        for name, source in sources.items():
            cache = work / f"cache-{name}-{round_}"
            for phase in ("cold", "warm"):
                run = embed_flow(url, source, cache, setting=f"{name} {phase}")
                key = (name, phase)
                if key not in best or run.seconds < best[key].seconds:
                    best[key] = run
            shutil.rmtree(cache, ignore_errors=True)
    return best


def _list_and_read(source: str) -> tuple[float, float, int]:
    """Seconds to list the source, and to read every image the way a task does (one client per call)."""
    from prefect_roboflow.flows._steps.sources import iter_image_refs, read_bytes

    started = time.perf_counter()
    refs = list(iter_image_refs(source))
    listed = time.perf_counter() - started
    started = time.perf_counter()
    size = sum(len(read_bytes(ref)) for ref in refs)
    return listed, time.perf_counter() - started, size


def run(url: str, images: int, photos: int, rounds: int) -> Table:
    """The comparison table."""
    import os

    from support.s3 import MotoServer, aws_env  # tests/ is on the path (see .common)

    table = Table(
        "Images in a bucket (moto, loopback) vs a local folder: embed_images",
        ["set", "phase", "local img/s", "S3 img/s", "local ÷ S3", "S3 list s", "S3 read s", "local read s"],
        note="cold: fresh cache (read, hash, resize, send); warm: cache full (read and hash only). "
        "Reads: every image read in turn in one process, as a task reads its batch's objects.",
    )
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        work = Path(tmp)
        server = MotoServer.start(work)
        try:
            os.environ.update(aws_env(server.endpoint, work))
            sets = {
                f"{images} PNG 320×240": generate_images(work / "small", images),
                f"{photos} JPEG 12 MP": generate_photos(photo_folder(), photos),
            }
            for index, (label, paths) in enumerate(sets.items()):
                local = work / f"local-{index}"
                local.mkdir()
                for path in paths:
                    shutil.copy(path, local / path.name)
                sources = {"local": str(local), "s3": _upload(server, f"bench-{index}", paths)}
                best = _rounds(url, sources, rounds, work)
                s3_list, s3_read, _ = _list_and_read(sources["s3"])
                _, local_read, _ = _list_and_read(sources["local"])
                for phase in ("cold", "warm"):
                    here, there = best[("local", phase)], best[("s3", phase)]
                    table.add(label, phase, here.rate, there.rate, ratio(here.rate, there.rate), s3_list, s3_read,
                              local_read)  # fmt: skip
        finally:
            server.stop()
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="http://127.0.0.1:9001")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--photos", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    from .bench import prefect_api

    with prefect_api():
        table = run(args.server, args.images, args.photos, args.rounds)
    print(table.text())
    if args.results:
        args.results.write_text(table.markdown() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
