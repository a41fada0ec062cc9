"""Dask, 2 worker processes vs 1 (issue 11): the CPU-side work of 12 MP photos on a `LocalCluster`.

    python -m benchmarks.dask_cpu [--photos 24] [--batch 4] [--rounds 3] [--results FILE]

What the steps do to a photo before any request, as the `embed` step does it on a worker: read
the file, hash it and check it is a whole image (`flows._sources.load_all`), then decode, resize
for CLIP ViT-B-16 and encode (`Clip.prepare_images`, which resizes on up to 4 threads of its own).
No server is involved. Both clusters (127.0.0.1, worker processes of one thread each) are started
first and the rounds interleave them, best round kept; the same work in this process, with no Dask,
is the baseline. The photos are `benchmarks.big_photos`'s (4000×3000 JPEGs, made once and kept).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path

from .common import Table, ratio

BATCH = 4


def cpu_side(refs: Sequence[str]) -> tuple[int, float]:
    """Read, hash, check and resize a batch of photos as the embed step does; (bytes sent, CPU s)."""
    from prefect_roboflow.blocks import Clip, InferenceServer
    from prefect_roboflow.flows._steps.sources import load_all
    from prefect_roboflow.flows.records import ImageRecord

    started = time.process_time()  # every thread of this process, the resize threads included
    records = load_all([ImageRecord(ref) for ref in refs])
    clip = Clip(server=InferenceServer(api_url="http://127.0.0.1:9"))  # never called
    prepared = clip.prepare_images([r.data for r in records if r.data is not None])
    size = sum(len(p["value"]) for p in prepared if isinstance(p, dict))
    return size, time.process_time() - started


def _batches(paths: Sequence[Path], batch: int) -> list[list[str]]:
    refs = [str(p) for p in paths]
    return [refs[i : i + batch] for i in range(0, len(refs), batch)]


def _on_cluster(client: object, batches: list[list[str]]) -> tuple[float, float]:
    """Wall seconds and worker CPU seconds for every batch, submitted at once."""
    started = time.perf_counter()
    futures = client.map(cpu_side, batches, pure=False)  # type: ignore[attr-defined]
    results = client.gather(futures)  # type: ignore[attr-defined]
    return time.perf_counter() - started, sum(cpu for _, cpu in results)


def _in_process(batches: list[list[str]]) -> tuple[float, float]:
    started = time.perf_counter()
    cpu = sum(cpu_side(batch)[1] for batch in batches)
    return time.perf_counter() - started, cpu


def measure(paths: Sequence[Path], batch: int, rounds: int) -> Table:
    """Best-of-``rounds`` wall time of the photos' CPU-side work: in process, Dask 1 worker, Dask 2 workers."""
    import cloudpickle
    import distributed

    cloudpickle.register_pickle_by_value(__import__(__name__, fromlist=["cpu_side"]))  # workers need no path
    batches = _batches(paths, batch)
    options = {"processes": True, "threads_per_worker": 1, "host": "127.0.0.1", "dashboard_address": None}
    best: dict[str, tuple[float, float]] = {}
    with (
        distributed.LocalCluster(n_workers=1, **options) as one,
        distributed.LocalCluster(n_workers=2, **options) as two,
        distributed.Client(one) as client_one,
        distributed.Client(two) as client_two,
    ):
        client_two.wait_for_workers(2)
        for client in (client_one, client_two):  # imports and first decode in every worker
            client.gather(client.map(cpu_side, batches[:2], pure=False))
        cpu_side(batches[0])
        runs = {
            "in this process (no Dask)": lambda: _in_process(batches),
            "Dask, 1 worker process": lambda: _on_cluster(client_one, batches),
            "Dask, 2 worker processes": lambda: _on_cluster(client_two, batches),
        }
        for _ in range(rounds):
            for name, run in runs.items():
                wall, cpu = run()
                if name not in best or wall < best[name][0]:
                    best[name] = (wall, cpu)
    load = os.getloadavg()[0]
    table = Table(
        f"Dask, CPU-side work of {len(paths)} camera photos (read, sha256, check, resize for CLIP), batches of {batch}",
        ["where", "seconds", "photos/s", "× 1 worker", "CPU s / photo", "CPU / wall"],
        note=f"Best of {rounds} interleaved rounds; both clusters on 127.0.0.1, one thread per worker process "
        f"(each resize also uses up to 4 threads of its own). {os.cpu_count()} cores shared with the inference "
        f"server and other work: 1-minute load average {load:.1f} at the end.",
    )
    base = len(paths) / best["Dask, 1 worker process"][0]
    for name, (wall, cpu) in best.items():
        rate = len(paths) / wall
        table.add(name, wall, rate, ratio(rate, base), cpu / len(paths), cpu / wall)
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=24)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--results", type=Path, default=None, help="append the table to this markdown file")
    args = parser.parse_args(argv)
    from .big_photos import generate_photos, photo_folder

    paths = [p for p in generate_photos(photo_folder(), args.photos) if p.suffix == ".jpg"]
    table = measure(paths, args.batch, args.rounds)
    print(table.text())
    if args.results is not None:
        with args.results.open("a") as out:
            out.write("\n" + table.markdown() + "\n")


if __name__ == "__main__":
    main()
