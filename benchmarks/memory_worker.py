"""Peak memory of one ``embed_images`` run, measured in a fresh process.

    python -m benchmarks.memory_worker IMAGES_DIR SERVER CACHE_DIR [BATCH_SIZE]

Prints one JSON object: images, seconds, the RSS after imports, the peak RSS (``VmHWM``), the
RSS at the end, and RSS samples (every 0.5 s) for seeing growth. Needs ``PREFECT_API_URL``.

``VmHWM``, not ``ru_maxrss``: Linux carries ``ru_maxrss`` over from the parent through fork and
exec, so a child of a large process reports the parent's size.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time

from prefect_roboflow.flows import embed_images


def status_mb(field: str = "VmRSS") -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: now; VmHWM: peak), MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(images: str, server: str, cache_dir: str, batch_size: str = "64") -> None:
    start_rss = status_mb()
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        begin = time.monotonic()
        while not done.wait(0.5):
            samples.append((round(time.monotonic() - begin, 1), round(status_mb(), 1)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with tempfile.TemporaryDirectory(prefix="bench-mem-out-") as out_dir:
        started = time.perf_counter()
        result = embed_images(
            images=images, out_dir=out_dir, server=server, cache_storage=cache_dir, batch_size=int(batch_size)
        )
        seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    print(
        json.dumps(
            {
                "images": result.images,
                "succeeded": result.succeeded,
                "seconds": seconds,
                "start_rss_mb": start_rss,
                "peak_rss_mb": status_mb("VmHWM"),
                "end_rss_mb": status_mb(),
                "samples": samples,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:5])
