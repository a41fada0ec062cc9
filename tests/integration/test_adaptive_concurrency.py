"""The adaptive concurrency limit against the real server: behind a proxy that admits only ``k``
requests at a time (429 beyond), and behind a link that adds latency. Counts, not timings."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from support.fault_proxy import FaultProxy
from support.images import make_image

from prefect_roboflow.blocks import Clip, InferenceServer, record_responses
from prefect_roboflow.blocks._http import describe_responses

pytestmark = pytest.mark.server

IMAGES = 40
#: The limit an engine starts from (`AdaptiveLimiter`'s default).
INITIAL_LIMIT = 4

#: The most 429s a proxy admitting ``k`` sends while 40 images go through, with the limiter's
#: defaults (start 4, probe gap 16). A 429 needs more than ``k`` in flight, and one epoch (the time
#: between two decreases) can have at most ``limit - k`` over. The first 4 go out together: at
#: most ``4 - k`` rejected, and the first 429 halves the limit to 2. From then on the limit grows by
#: one, so every excursion above ``k`` ends at its one 429: at most one on the way back up below
#: the first ceiling (4), then probes after 16 and 16 + 32 = 48 good answers: 40 images allow one.
#: k=2: 2 + 1 + 1 = 4.  k=3: 1 + 1 + 1 = 3 (the way back up to 3 stays below the ceiling: one to spare).
#: `tests/unit/test_limiter.py::rejection_bound` computes this for any k; its simulations check it.
REJECTION_BOUND = {2: 4, 3: 3}


@pytest.fixture(scope="module")
def forty(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("forty")
    paths = []
    for i in range(IMAGES):
        path = folder / f"img_{i:02d}.png"
        path.write_bytes(make_image(7000 + i, size=(96, 72)))
        paths.append(path)
    return paths


@pytest.mark.parametrize("k", [2, 3])
def test_a_server_that_admits_k_gets_few_429s_and_no_errors(inference_url: str, forty: list[Path], k: int) -> None:
    # Each admitted request holds its place 50 ms at least (a slow GPU box): the requests of one
    # round overlap at the proxy, so a limit above k meets a 429 before a round can pass it.
    with FaultProxy(inference_url, max_in_flight=k, service_time=0.05, retry_after="0.2") as proxy:
        server = InferenceServer(api_url=proxy.url, retry_backoff_seconds=0.05)
        clip = Clip(server=server)
        with record_responses() as infos:
            vectors = clip.embed_images(forty)  # raises if any image ended in a RateLimitedError
        assert vectors.shape[0] == IMAGES and len(infos) == IMAGES
        assert proxy.peak_in_flight <= k and proxy.count("/clip/embed_image") == IMAGES + proxy.rejected
        assert proxy.rejected <= REJECTION_BOUND[k]
        retries = sum(i.attempts - 1 for i in infos)
        assert retries == proxy.rejected  # every 429 was retried, nothing else failed
        limits = [i.concurrency_limit for i in infos]
        # settled at or below k: above it only while a probe waits for its 429
        assert statistics.median(limits) <= k and server.engine.concurrency_limit <= k + 1
        assert f"concurrency limit {limits[-1]} (peak {max(limits)})" in describe_responses(infos)


def test_the_limit_grows_past_its_start_across_a_slow_link(inference_url: str, forty: list[Path]) -> None:
    # 100 ms each request: the limit's first round of 4 answers sees the latency hold (a queue
    # needs a median latency 4x the fastest), so slow start doubles it.
    with FaultProxy(inference_url, latency=0.1) as proxy:
        server = InferenceServer(api_url=proxy.url)
        assert server.engine.concurrency_limit == INITIAL_LIMIT
        with record_responses() as infos:
            Clip(server=server).embed_images(forty)
        assert max(i.concurrency_limit for i in infos) > INITIAL_LIMIT
        assert server.engine.concurrency_peak > INITIAL_LIMIT
        assert proxy.peak_in_flight > INITIAL_LIMIT  # the requests really went out together
        assert all(i.attempts == 1 for i in infos)
