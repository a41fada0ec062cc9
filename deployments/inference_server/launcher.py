"""Serve Roboflow's inference HTTP API with uvicorn, without docker.

Run with the server venv's python, from the run directory (model ids such as
``clip/ViT-B-16`` resolve as paths relative to the working directory):

    python launcher.py --host 127.0.0.1 --port 9001

The app is built the way inference's docker entrypoint
(``docker/config/cpu_http.py``) builds it: RoboflowModelRegistry -> ModelManager
-> WithFixedSizeCache -> HttpInterface(...).app. What the entrypoint does besides
that is left out on purpose: the stream manager process (ENABLE_STREAM_API is
off) and the active-learning manager (ACTIVE_LEARNING_ENABLED is off).
"""

import argparse
import os
import random


def build_app():
    # Imported here: inference reads its configuration from the environment at
    # import time, and `up` sets that environment before starting us.
    from inference.core.env import MAX_ACTIVE_MODELS
    from inference.core.interfaces.http.http_api import HttpInterface
    from inference.core.managers.base import ModelManager
    from inference.core.managers.decorators.fixed_size_cache import WithFixedSizeCache
    from inference.core.registries.roboflow import RoboflowModelRegistry
    from inference.models.utils import ROBOFLOW_MODEL_TYPES

    model_registry = RoboflowModelRegistry(ROBOFLOW_MODEL_TYPES)
    model_manager = ModelManager(model_registry=model_registry)
    model_manager = WithFixedSizeCache(model_manager, max_size=MAX_ACTIVE_MODELS)
    # As in the entrypoint: sets the manager's error counter and server uuid;
    # the pingback thread itself only starts when METRICS_ENABLED is on.
    model_manager.init_pingback()
    return HttpInterface(model_manager).app


def seed_everything(seed):
    # The placeholder Perception Encoder is built from random init when the
    # first PE request arrives; a seeded RNG makes its embeddings repeat across
    # restarts (as long as nothing else draws from torch's RNG first).
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    args = parser.parse_args()

    import uvicorn

    app = build_app()
    seed = os.environ.get("PLACEHOLDER_SEED")
    if seed not in (None, ""):
        seed_everything(int(seed))
    uvicorn.run(app, host=args.host, port=args.port, workers=1, log_level="info")


if __name__ == "__main__":
    main()
