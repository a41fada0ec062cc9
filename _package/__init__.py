"""prefect-roboflow: Prefect 3 blocks, tasks and flows for the foundation models of a Roboflow
Inference server (CLIP, Perception Encoder, OWLv2).

- `prefect_roboflow.blocks`: the typed blocks (`InferenceServer`, `Clip`, `PerceptionEncoder`,
  `OwlV2`) and their tasks (`prefect_roboflow.blocks.tasks`).
- `prefect_roboflow.flows`: ready flows and the public steps they are made of.

This file is the package's top (`prefect_roboflow/__init__.py` in the wheel; see pyproject's
``[tool.hatch.build.targets.wheel]``). It imports nothing, so ``import prefect_roboflow`` stays cheap.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
