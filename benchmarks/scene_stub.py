"""A stand-in inference server whose answers *mean* something, for end-to-end checks of the flows
against planted truth (the placeholder weights find nothing real).

    python -m benchmarks.scene_stub [--port N]

It prints ``http://127.0.0.1:PORT`` once it listens (127.0.0.1 only) and serves until stopped by its
PID (`SceneStub` starts and stops it). What it answers:

- ``POST /owlv2/infer``: one box per blob of saturated colour in the image (HSV saturation and value
  over `SATURATED`; 8-connected; at least `MIN_BLOB` pixels), class the examples' first, confidence
  0.995 — plus, like OWLv2, which pads every image to a square, one box wholly in the padding (past
  the bottom edge of a landscape image, past the right edge of a portrait one).
- ``POST /clip/embed_image`` (and ``/perception_encoder/...``): a function of the crop's pixels — the
  histogram of the hues of its saturated pixels (`HUE_BINS` bins), normalised, zero-padded to the
  version's dimension. Two crops of one blob match; blobs of other colours are orthogonal.
- ``POST /clip/embed_text``: a prompt naming a colour (``"a red object"``) gets that colour's hue
  histogram; any other text a fixed vector from its hash.
- ``GET /info``, ``GET /stats`` (requests per route).

The answers have the real server's field names and shapes (see `benchmarks/gpu_stub.py`).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from benchmarks.gpu_stub import DEFAULT_DIM, DEFAULTS, DIMENSIONS, Receive, Send

__all__ = ["COLOURS", "HUE_BINS", "SceneStub", "blobs", "embed_pixels"]

#: Saturation and value (0–1) over which a pixel belongs to a blob.
SATURATED = 0.5
MIN_BLOB = 30
HUE_BINS = 12
#: Colours a prompt may name, by hue in degrees.
COLOURS = {"red": 0.0, "yellow": 60.0, "green": 120.0, "cyan": 180.0, "blue": 240.0, "magenta": 300.0}


def _decode(image: Any) -> np.ndarray:
    """An RGB array from a request's image object (EXIF orientation applied, as the real server's OpenCV does)."""
    from PIL import Image, ImageOps

    value = image["value"] if isinstance(image, dict) else image
    with Image.open(io.BytesIO(base64.b64decode(value))) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pixels = rgb.astype(np.float32) / 255
    high, low = pixels.max(axis=2), pixels.min(axis=2)
    span = np.where(high > low, high - low, 1.0)
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    hue = np.where(high == r, (g - b) / span % 6, np.where(high == g, (b - r) / span + 2, (r - g) / span + 4)) * 60
    saturation = np.where(high > 0, (high - low) / np.where(high > 0, high, 1.0), 0.0)
    return hue, saturation, high


def blobs(rgb: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (x1, y1, x2, y2; x2, y2 exclusive) of the saturated blobs, largest first."""
    import cv2

    _, saturation, value = _hsv(rgb)
    mask = ((saturation > SATURATED) & (value > SATURATED)).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    found = [(int(x), int(y), int(x + w), int(y + h), int(a)) for x, y, w, h, a in stats[1:count] if a >= MIN_BLOB]
    return [b[:4] for b in sorted(found, key=lambda b: -b[4])]


def _hue_vector(hues: np.ndarray) -> np.ndarray:
    histogram = np.zeros(HUE_BINS, np.float64)
    if hues.size:
        bins = np.floor(((hues + 180 / HUE_BINS) % 360) / (360 / HUE_BINS)).astype(int) % HUE_BINS
        histogram = np.bincount(bins, minlength=HUE_BINS).astype(np.float64)
    return histogram


def embed_pixels(rgb: np.ndarray, dim: int) -> list[float]:
    """A crop's embedding: the normalised histogram of its saturated pixels' hues, zero-padded."""
    hue, saturation, value = _hsv(rgb)
    histogram = _hue_vector(hue[(saturation > SATURATED) & (value > SATURATED)])
    vector = np.zeros(dim)
    vector[:HUE_BINS] = histogram
    vector[HUE_BINS] = 0.05 * float(value.mean())  # a little of the rest, so a grey crop is not the zero vector
    return (vector / np.linalg.norm(vector)).tolist()


def _embed_text(text: str, dim: int) -> list[float]:
    vector = np.zeros(dim)
    named = [hue for name, hue in COLOURS.items() if name in text.lower()]
    if named:
        vector[:HUE_BINS] = _hue_vector(np.array(named[:1]))
    else:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        vector[:] = np.random.default_rng(seed).standard_normal(dim)
    return (vector / np.linalg.norm(vector)).tolist()


class _State:
    def __init__(self) -> None:
        self.stats: Counter[str] = Counter()


def _owlv2(body: dict[str, Any]) -> tuple[int, bytes]:
    if "image" not in body or "training_data" not in body:
        return 422, b'{"detail":[{"type":"missing","loc":["body","image"],"msg":"Field required"}]}'
    rgb = _decode(body["image"])
    height, width = rgb.shape[:2]
    classes = sorted({box.get("cls", "object") for ex in body["training_data"] for box in ex.get("boxes", [])})
    name = classes[0] if classes else "object"
    boxes = [(float(x1), float(y1), float(x2), float(y2)) for x1, y1, x2, y2 in blobs(rgb)]
    side = max(width, height)  # OWLv2 pads to a square: a box may land in the padding
    if width >= height:
        boxes.append((width * 0.4, height + (side - height) / 4, width * 0.6, height + (side - height) / 2 + 1))
    else:
        boxes.append((width + (side - width) / 4, height * 0.4, width + (side - width) / 2 + 1, height * 0.6))
    predictions = [
        {
            "x": (x1 + x2) / 2,
            "y": (y1 + y2) / 2,
            "width": x2 - x1,
            "height": y2 - y1,
            "confidence": 0.995,
            "class": name,
            "class_confidence": None,
            "class_id": 0,
            "tracker_id": None,
            "detection_id": str(uuid.uuid4()),
            "parent_id": None,
        }
        for x1, y1, x2, y2 in boxes
    ]
    answer = {
        "inference_id": str(uuid.uuid4()),
        "frame_id": None,
        "time": 0.0,
        "image": {"width": width, "height": height},
        "predictions": predictions,
        "visualization": None,
    }
    return 200, json.dumps(answer).encode()


def _embed(family: str, body: dict[str, Any], field: str) -> tuple[int, bytes]:
    if field not in body:
        return 422, b'{"detail":[{"type":"missing","loc":["body","image"],"msg":"Field required"}]}'
    items = body[field] if isinstance(body[field], list) else [body[field]]
    if len(items) > 8:
        return 500, b'{"message":"Internal error."}'
    dim = DIMENSIONS.get(body.get(f"{family}_version_id") or DEFAULTS[family], DEFAULT_DIM)
    if field == "image":
        vectors = [embed_pixels(_decode(item), dim) for item in items]
    else:
        vectors = [_embed_text(str(item), dim) for item in items]
    return 200, json.dumps({"inference_id": None, "frame_id": None, "time": 0.0, "embeddings": vectors}).encode()


def _route(state: _State, method: str, path: str, raw: bytes) -> tuple[int, bytes, str]:
    if method == "GET" and path == "/info":
        return 200, b'{"name":"scene-stub","version":"1.8.3","uuid":"scene-stub"}', ""
    if method == "GET" and path == "/stats":
        return 200, json.dumps(dict(state.stats)).encode(), ""
    if method != "POST":
        return 405, b'{"detail":"Method Not Allowed"}', ""
    try:
        body = json.loads(raw)
    except ValueError:
        return 422, b'{"detail":[{"type":"json_invalid","msg":"JSON decode error"}]}', ""
    state.stats[path] += 1
    family, _, action = path.strip("/").partition("/")
    if path == "/owlv2/infer":
        return (*_owlv2(body), f"owlv2/{body.get('owlv2_version_id') or DEFAULTS['owlv2']}")
    if family in ("clip", "perception_encoder") and action in ("embed_image", "embed_text"):
        model = f"{family}/{body.get(f'{family}_version_id') or DEFAULTS[family]}"
        return (*_embed(family, body, action.removeprefix("embed_")), model)
    return 404, b'{"message":"Requested Roboflow resource not found."}', ""


def app() -> Any:
    """The stub's ASGI app."""
    state = _State()

    async def serve(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = (await receive())["type"]
                if event == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        status, body, model = _route(state, scope["method"], scope["path"], b"".join(chunks))
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(b"x-inference-engine", b"scene-stub")] + ([(b"x-model-id", model.encode())] if model else [])
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return serve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    args = parser.parse_args()
    import asyncio

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    config = uvicorn.Config(app(), log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    config.load()

    async def run() -> None:
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        print(f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
        await task

    asyncio.run(run())


class SceneStub:
    """The stub in its own process on 127.0.0.1, started on enter and stopped by its PID on exit."""

    def __init__(self, port: int = 0) -> None:
        self.port, self.url = port, ""
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> SceneStub:
        repo = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
        args = [sys.executable, "-m", "benchmarks.scene_stub", "--port", str(self.port)]
        self._process = subprocess.Popen(args, cwd=repo, stdout=subprocess.PIPE, text=True, env=env)
        assert self._process.stdout is not None
        self.url = self._process.stdout.readline().strip()
        if not self.url.startswith("http://127.0.0.1:"):
            self.__exit__(None, None, None)
            raise RuntimeError(f"the scene stub did not start (exit code {self._process.poll()})")
        return self

    def stats(self) -> dict[str, int]:
        import httpx

        return dict(httpx.get(f"{self.url}/stats", timeout=10).json())

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


if __name__ == "__main__":
    main()
