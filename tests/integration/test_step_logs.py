"""Each step's log line says what the step did: the server's figures (requests, model time, engine,
retries) only when it sent requests. A fully cached `detect` or a local `crop` said "0 request(s),
server model time 0.000s, engine unknown, 0 retries". The server is the GPU stub (its own process)."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.images import make_image
from support.runs import logs_of

from prefect_roboflow.flows import detect_crop_classify

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.gpu_stub import StubServer  # noqa: E402

SERVER_FIGURES = re.compile(r"request\(s\)|server model time|engine|retries")


@pytest.fixture(scope="module")
def stub() -> Iterator[StubServer]:
    with StubServer() as server:
        yield server


def _step_lines(state: object) -> dict[str, list[str]]:
    lines: dict[str, list[str]] = {}
    for message in logs_of(state):
        step = re.match(r"(\w+) batch \d+/\d+: ", message)
        if step:
            lines.setdefault(step.group(1), []).append(message)
    return lines


def test_a_step_tells_server_figures_only_when_it_sent_requests(stub: StubServer, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        (photos / f"{i}.png").write_bytes(make_image(60 + i))
    examples = [{"image": str(photos / "0.png"), "boxes": [{"x": 160, "y": 120, "w": 80, "h": 60, "cls": "can"}]}]
    kwargs = {"server": stub.url, "cache_storage": str(tmp_path / "cache"), "return_state": True}

    cold = _step_lines(detect_crop_classify(str(photos), examples, ["a can", "a lid"], str(tmp_path / "a"), **kwargs))
    assert {"detect", "crop", "embed", "classify"} <= set(cold)
    for step in ("detect", "embed"):  # they sent requests: the server's figures
        assert all("sent" in line and "request(s)" in line and "engine gpu-stub" in line for line in cold[step])
    for step in ("crop", "classify"):  # local steps: counts only
        assert all(not SERVER_FIGURES.search(line) for line in cold[step]), cold[step]

    warm = _step_lines(detect_crop_classify(str(photos), examples, ["a can", "a lid"], str(tmp_path / "b"), **kwargs))
    for step in ("detect", "crop", "embed", "classify"):  # everything from the cache or local: no server figures
        assert all(not SERVER_FIGURES.search(line) and " sent" not in line for line in warm[step]), warm[step]
    assert all("4 from cache" in line for line in warm["detect"])
