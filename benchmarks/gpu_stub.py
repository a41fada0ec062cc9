"""An inference server that answers at once: a stand-in for a GPU, so only the client's cost is left.

    python -m benchmarks.gpu_stub [--dim N]

It prints ``http://127.0.0.1:PORT`` on stdout once it listens (a free port on 127.0.0.1 only) and
serves until stopped (by its PID: `StubServer` starts and stops it). **It measures the client's
cost, never correctness**: every embedding is one fixed vector of the version's dimension
(contract §1.1 and §2; ``--dim`` forces another, e.g. 100, to test the client's dimension check),
every similarity is a fixed number, and OWLv2 answers one box per class of its examples on every
image. The answers have the contract's field names and shapes — ``embeddings`` (n vectors for n
images or texts), ``similarity`` (a list in prompt order, or a dict keyed as the prompt),
``image`` and ``predictions`` — and the response headers a real server sends
(``x-inference-engine``, ``x-model-id``).

Routes: ``POST /clip/embed_image|embed_text|compare``, ``POST /perception_encoder/embed_image|
embed_text|compare``, ``POST /owlv2/infer``; ``GET /info``; ``GET /stats`` (requests and items per
route since the start or the last ``POST /stats/reset``); ``POST /dim`` with ``{"dim": N}`` forces
N-value embeddings from then on (``null``: the version's size again). A body that is not JSON, or lacks the
required field, is a 422 as on the real server; more than 8 images or prompts a 500.

A raw ASGI app under uvicorn (no framework): the stub's own cost per request is a JSON parse of
the body and a pre-built answer, in a process of its own.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from prefect_roboflow.blocks import CLIP_DIMENSIONS, PE_DIMENSIONS

__all__ = ["DIMENSIONS", "StubServer", "app_for"]

#: Embedding size per version: the blocks' own tables (contract §1.1, §2); an unknown version gets `DEFAULT_DIM`.
DIMENSIONS: dict[str, int] = {**CLIP_DIMENSIONS, **PE_DIMENSIONS}
DEFAULT_DIM = 512
#: CLIP_MAX_BATCH_SIZE: more images or prompts in one request is a 500 on the real server.
MAX_ITEMS = 8
DEFAULTS = {"clip": "ViT-B-16", "perception_encoder": "PE-Core-L14-336", "owlv2": "owlv2-large-patch14-ensemble"}

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class _Answers:
    """The pre-built parts of the answers: one vector per dimension, serialised once."""

    def __init__(self, dim: int | None) -> None:
        import numpy as np

        self.forced_dim = dim
        self._vectors: dict[int, str] = {}
        self._rng = np.random.default_rng(0)
        self.stats: Counter[str] = Counter()

    def vector(self, dim: int) -> str:
        """The JSON text of one fixed vector of ``dim`` floats (full-precision reprs, as a server sends)."""
        text = self._vectors.get(dim)
        if text is None:
            values = self._rng.standard_normal(dim).astype("float32")
            text = self._vectors[dim] = json.dumps([float(v) for v in values])
        return text

    def dim_of(self, version: str) -> int:
        return self.forced_dim or DIMENSIONS.get(version, DEFAULT_DIM)


def _count(value: Any) -> int:
    return len(value) if isinstance(value, list) else 1


def _image_size(image: Any) -> tuple[int, int]:
    """Width and height from the header of a base64 image (OWLv2 answers carry them); 0×0 if unreadable."""
    import base64

    from PIL import Image

    try:
        value = image["value"] if isinstance(image, dict) else image
        # The header is at the start: 128 KiB of base64 is enough (an EXIF block is at most 64 KiB).
        with Image.open(io.BytesIO(base64.b64decode(value[: 128 * 1024]))) as img:
            return img.size
    except Exception:
        return 0, 0


def _embed(answers: _Answers, family: str, body: dict[str, Any], field: str) -> tuple[int, bytes]:
    if field not in body:
        missing = {"detail": [{"type": "missing", "loc": ["body", field], "msg": "Field required"}]}
        return 422, json.dumps(missing).encode()
    n = _count(body[field])
    if field == "image" and n > MAX_ITEMS:
        return 500, b'{"message":"Internal error."}'
    answers.stats[f"/{family}/embed_{field}:items"] += n
    version = body.get(f"{family}_version_id") or DEFAULTS[family]
    vector = answers.vector(answers.dim_of(version))
    embeddings = ",".join([vector] * n)
    return 200, f'{{"inference_id":null,"frame_id":null,"time":0.0,"embeddings":[{embeddings}]}}'.encode()


def _compare(answers: _Answers, family: str, body: dict[str, Any]) -> tuple[int, bytes]:
    if "subject" not in body or "prompt" not in body:
        return 422, b'{"detail":[{"type":"missing","loc":["body","subject"],"msg":"Field required"}]}'
    prompt = body["prompt"]
    if isinstance(prompt, dict) and set(prompt) != {"type", "value"}:
        similarity: Any = dict.fromkeys(prompt, 0.25)
    else:
        similarity = [0.25] * _count(prompt)
    if len(similarity) > MAX_ITEMS:
        return 500, b'{"message":"Internal error."}'
    answers.stats[f"/{family}/compare:items"] += len(similarity)
    answer = {"inference_id": None, "frame_id": None, "time": 0.0, "similarity": similarity, "parent_id": None}
    return 200, json.dumps(answer).encode()


def _owlv2(answers: _Answers, body: dict[str, Any]) -> tuple[int, bytes]:
    if "image" not in body or "training_data" not in body:
        return 422, b'{"detail":[{"type":"missing","loc":["body","image"],"msg":"Field required"}]}'
    if isinstance(body["image"], list):
        return 500, b"Internal Server Error"  # the route's response model takes one image (contract 3.3)
    width, height = _image_size(body["image"])
    classes = sorted({box.get("cls", "object") for ex in body["training_data"] for box in ex.get("boxes", [])})
    predictions = [
        {
            "x": width / 2,
            "y": height / 2,
            "width": max(1, width // 4),
            "height": max(1, height // 4),
            "confidence": 0.995,
            "class": name,
            "class_confidence": None,
            "class_id": i,
            "tracker_id": None,
            "detection_id": str(uuid.uuid4()),
            "parent_id": None,
        }
        for i, name in enumerate(classes)
    ]
    answers.stats["/owlv2/infer:items"] += 1
    answer = {
        "inference_id": body.get("id") or str(uuid.uuid4()),
        "frame_id": None,
        "time": 0.0,
        "image": {"width": width, "height": height},
        "predictions": predictions,
        "visualization": None,
    }
    return 200, json.dumps(answer).encode()


def app_for(dim: int | None = None) -> Callable[[dict[str, Any], Receive, Send], Awaitable[None]]:
    """The stub's ASGI app; ``dim`` forces every embedding to that many values."""
    answers = _Answers(dim)

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
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
        method, path = scope["method"], scope["path"]
        status, body, model = _route(answers, method, path, b"".join(chunks))
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),  # as the real server: no chunked encoding
            (b"x-inference-engine", b"gpu-stub"),
        ]
        if model:
            headers.append((b"x-model-id", model.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def _route(answers: _Answers, method: str, path: str, raw: bytes) -> tuple[int, bytes, str]:
    if method == "GET" and path == "/info":
        return 200, b'{"name":"gpu-stub","version":"1.8.3","uuid":"gpu-stub"}', ""
    if method == "GET" and path == "/stats":
        return 200, json.dumps(dict(answers.stats)).encode(), ""
    if method == "POST" and path == "/stats/reset":
        answers.stats.clear()
        return 200, b"{}", ""
    if method == "POST" and path == "/dim":  # {"dim": N} forces N-value embeddings from now on, null undoes it
        answers.forced_dim = json.loads(raw).get("dim")
        return 200, b"{}", ""
    if method != "POST":
        return 405, b'{"detail":"Method Not Allowed"}', ""
    try:
        body = json.loads(raw)
    except ValueError:
        return 422, b'{"detail":[{"type":"json_invalid","msg":"JSON decode error"}]}', ""
    if not isinstance(body, dict):
        return 422, b'{"detail":[{"type":"model_attributes_type","msg":"Input should be an object"}]}', ""
    answers.stats[path] += 1
    family, _, action = path.strip("/").partition("/")
    if family in ("clip", "perception_encoder"):
        model = f"{family}/{body.get(f'{family}_version_id') or DEFAULTS[family]}"
        if action == "embed_image":
            return (*_embed(answers, family, body, "image"), model)
        if action == "embed_text":
            return (*_embed(answers, family, body, "text"), model)
        if action == "compare":
            return (*_compare(answers, family, body), model)
    if path == "/owlv2/infer":
        return (*_owlv2(answers, body), f"owlv2/{body.get('owlv2_version_id') or DEFAULTS['owlv2']}")
    return 404, b'{"message":"Requested Roboflow resource not found."}', ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dim", type=int, default=None, help="answer embeddings of this size for every version")
    args = parser.parse_args()
    import uvicorn

    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # without it Nagle holds the answer's last segment for the client's delayed ACK (~40 ms a request).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app_for(args.dim), log_level="warning", access_log=False, lifespan="on", timeout_keep_alive=60, backlog=512
    )
    server = uvicorn.Server(config)
    config.load()

    import asyncio

    async def serve() -> None:
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        print(f"http://127.0.0.1:{port}", flush=True)
        await task

    asyncio.run(serve())


class StubServer:
    """The stub in its own process (so its CPU is not the client's), on a free port of 127.0.0.1,
    started on enter and stopped by its PID on exit; ``url`` once started.

    Examples:
        ```python
        with StubServer() as stub:
            Clip(server=InferenceServer(api_url=stub.url)).embed_images(paths)
            stub.stats()  # {'/clip/embed_image': 2, '/clip/embed_image:items': 2}
        ```
    """

    def __init__(self, dim: int | None = None) -> None:
        self.dim = dim
        self.url = ""
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> StubServer:
        repo = Path(__file__).resolve().parents[1]
        args = [sys.executable, "-m", "benchmarks.gpu_stub"] + ([] if self.dim is None else ["--dim", str(self.dim)])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
        self._process = subprocess.Popen(args, cwd=repo, stdout=subprocess.PIPE, text=True, env=env)
        assert self._process.stdout is not None
        self.url = self._process.stdout.readline().strip()
        if not self.url.startswith("http://127.0.0.1:"):
            self.__exit__(None, None, None)
            raise RuntimeError(f"the GPU stub did not start (exit code {self._process.poll()})")
        return self

    @property
    def pid(self) -> int:
        """The stub process's PID (its CPU time is its own, never the client's)."""
        assert self._process is not None
        return self._process.pid

    def stats(self) -> dict[str, int]:
        """Requests (and items, ``route:items``) per route since the start or the last `reset`."""
        import httpx

        return dict(httpx.get(f"{self.url}/stats", timeout=10).json())

    def force_dim(self, dim: int | None) -> None:
        """Answer embeddings of ``dim`` values from now on (None: each version's own size)."""
        import httpx

        httpx.post(f"{self.url}/dim", json={"dim": dim}, timeout=10).raise_for_status()

    def reset(self) -> None:
        """Forget the counts."""
        import httpx

        httpx.post(f"{self.url}/stats/reset", timeout=10).raise_for_status()

    def cpu_seconds(self) -> float:
        """CPU seconds the stub process has used (from /proc; NaN where there is none)."""
        from .common import process_cpu

        return process_cpu(self.pid)

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
