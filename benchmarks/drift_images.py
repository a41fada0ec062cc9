"""Image windows for the drift power benchmark: synthetic street-like scenes embedded with CLIP through
the real inference server, plain, darker (pixels × 0.7) and recoloured (R, G, B → G, B, R), cached as
one ``.npz`` so the benchmark's trials draw windows from the pools without re-embedding.

    .venv/bin/python -m benchmarks.drift_images --server http://127.0.0.1:9001   # ~3-5 min on 2 shared cores
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

#: Plain images: the reference pool and the same-distribution current pool; then the two drifts.
POOLS = {"reference": 1500, "plain": 1500, "darker": 1500, "recoloured": 1500}
CACHE = Path(os.environ.get("PREFECT_ROBOFLOW_CACHE", Path.home() / ".cache" / "prefect-roboflow")) / "drift-power"


def scene(seed: int, variant: str = "plain") -> bytes:
    """A 224×224 scene: a sky-to-ground gradient, a few objects, sensor noise; then the variant."""
    rng = np.random.default_rng(seed)
    top, bottom = rng.integers(60, 220, size=3), rng.integers(30, 180, size=3)
    ramp = np.linspace(0.0, 1.0, 224)[:, None, None]
    pixels = (top * (1 - ramp) + bottom * ramp) * np.ones((224, 224, 3))
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 7))):
        x, y = (int(v) for v in rng.integers(0, 200, size=2))
        w, h = (int(v) for v in rng.integers(12, 90, size=2))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=colour)
    array = np.asarray(image, dtype=np.float64) + rng.normal(0, 6, size=(224, 224, 3))
    if variant == "darker":
        array = array * 0.7
    elif variant == "recoloured":
        array = array[:, :, [1, 2, 0]]
    buffer = io.BytesIO()
    Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def load_pools(server: str, path: Path | None = None) -> dict[str, np.ndarray]:
    """The pools' embeddings (rows: unit vectors), embedded once and cached at ``path``."""
    path = path or CACHE / "image_pools.npz"
    if path.exists():
        with np.load(path) as cached:
            return {name: cached[name] for name in cached.files}
    from prefect_roboflow.blocks import Clip, InferenceServer

    clip = Clip(server=InferenceServer(url=server))
    pools, seed = {}, 0
    for name, count in POOLS.items():
        variant = "plain" if name == "reference" else name
        # the reference and plain pools are different scenes; darker/recoloured are new scenes too
        seeds = range(seed, seed + count)
        seed += count
        started = time.perf_counter()
        vectors = np.vstack(
            [clip.embed_images([scene(s, variant) for s in list(seeds)[i : i + 64]]) for i in range(0, count, 64)]
        )
        pools[name] = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
        print(f"{name}: {count} images in {time.perf_counter() - started:.0f} s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **pools)
    return pools


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default=os.environ.get("INFERENCE_SERVER_URL", "http://127.0.0.1:9001"))
    args = parser.parse_args()
    pools = load_pools(args.server)
    print({name: pool.shape for name, pool in pools.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
