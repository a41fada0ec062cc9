"""inference-sdk baseline, run by an interpreter that has ``inference_sdk`` (not the project venv).

    SDK_PYTHON benchmarks/sdk_worker.py API_URL PATHS_FILE CONCURRENCY[,CONCURRENCY...]

For each concurrency, times ``InferenceHTTPClient.get_clip_image_embeddings(paths)`` with
``InferenceConfiguration(max_concurrent_requests=c)`` (c=1 is the SDK's default) and the default
``max_batch_size=1``: CLIP on this server stacks a list of images into one, so one image per
request is the only correct use. Prints one JSON object per line: concurrency, images, seconds.
Interpreter start-up and imports are outside the timings.
"""

from __future__ import annotations

import json
import sys
import time
import warnings

from inference_sdk import InferenceConfiguration, InferenceHTTPClient


def main(api_url: str, paths_file: str, concurrencies: str) -> None:
    warnings.filterwarnings("ignore", message="This client sends the Roboflow API key")
    with open(paths_file) as handle:
        paths = [line.strip() for line in handle if line.strip()]
    warm = InferenceHTTPClient(api_url=api_url)
    warm.get_clip_image_embeddings(paths[0])  # model loaded, connections open
    for concurrency in (int(c) for c in concurrencies.split(",")):
        client = InferenceHTTPClient(api_url=api_url)
        if concurrency != 1:
            client.configure(InferenceConfiguration(max_concurrent_requests=concurrency))
        started = time.perf_counter()
        result = client.get_clip_image_embeddings(paths)
        seconds = time.perf_counter() - started
        answers = result if isinstance(result, list) else [result]
        embeddings = sum(len(a["embeddings"]) for a in answers)
        if embeddings != len(paths):
            raise SystemExit(f"expected {len(paths)} embeddings, got {embeddings}")
        print(json.dumps({"concurrency": concurrency, "images": len(paths), "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
