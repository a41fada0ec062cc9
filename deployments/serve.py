"""Serve every prefect-roboflow flow from this process: schedules and webhook triggers, no work pool.

    export PREFECT_API_URL=http://127.0.0.1:4200/api       # a running `prefect server start`
    IMAGES_DIR=/data/incoming OUT_DIR=/data/roboflow python deployments/serve.py

Deployments (``<flow>/<name>``, name ``local`` unless ``--name``):

- ``embed-images``: embeds ``IMAGES_DIR`` nightly (``--cron``, or every ``--interval`` seconds),
  and the images of each ``prefect_roboflow.images.arrived`` event for it (see ``webhook.py``).
- ``detect-crop-classify``: the bundled few-shot examples and labels, run on each event's images.
- ``classify-images`` and ``search-images``: on demand (``prefect deployment run``, or the UI).
- ``monitor-drift``: scores ``IMAGES_DIR`` against the pinned embedding baseline daily
  (``--drift-cron``); pin one first with ``--param save_baseline=true`` (see README.md).
- ``auto-label``: on each ``prefect_roboflow.drift.detected`` event, labels the drifted window for
  review (COCO, Label Studio tasks, CVAT zip) under ``OUT_DIR/auto-label/drift/<event id>/``.
- ``curate-images``: after each completed ``embed-images`` run (its ``…embed_images.completed``
  event), scores that run's table and selects the next rows to label, under
  ``OUT_DIR/curate-images/events/<event id>/``.

The inference server is ``--server`` / ``INFERENCE_SERVER_URL`` (a URL or a saved block name).
Runs go to ``OUT_DIR/<flow>/``, and those started by an event to ``OUT_DIR/<flow>/events/<event id>/``.

A run a trigger creates starts at serve's next poll for scheduled runs: every ``--poll`` seconds
(``PREFECT_RUNNER_POLL_FREQUENCY``; 2 here, Prefect's default is 10), one small API query each.
Each run is a new process, which imports this file again: the flows and the webhook's names are
therefore imported inside the functions below, not at the top.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

if TYPE_CHECKING:
    from prefect.events import DeploymentEventTrigger

#: Seconds between serve's polls for runs to start: a triggered run waits half of it on average.
DEFAULT_POLL_SECONDS = 2.0


def arrival_trigger(flow: str, out_dir: str) -> DeploymentEventTrigger:
    """Run the deployment over the images of each images-arrived event addressed to ``flow``."""
    from prefect.events import DeploymentEventTrigger
    from webhook import EVENT, trigger_match, trigger_parameters

    return DeploymentEventTrigger(
        name=f"{flow} when images arrive",
        expect={EVENT},
        match=trigger_match(flow),  # type: ignore[arg-type]
        parameters=trigger_parameters(flow, out_dir),
    )


def drift_trigger(out_dir: str) -> DeploymentEventTrigger:
    """Run the deployment over the window of each drift event (``monitor_drift``'s ``current``)."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name="auto_label the drifted window",
        expect={"prefect_roboflow.drift.detected"},
        match={"prefect.resource.id": "prefect_roboflow.drift.*"},  # type: ignore[arg-type]
        parameters={"images": "{{ event.payload.current }}", "out_dir": f"{out_dir}/drift/{{{{ event.id }}}}"},
    )


def embedded_trigger(out_dir: str) -> DeploymentEventTrigger:
    """Run the deployment over the table of each completed ``embed_images`` run."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name="curate_images after each embed_images run",
        expect={"prefect_roboflow.embed_images.completed"},
        match={"prefect.resource.id": "prefect_roboflow.flow-run.*", "prefect.resource.name": "embed-images"},  # type: ignore[arg-type]
        parameters={"source": "{{ event.payload.embeddings_path }}", "out_dir": f"{out_dir}/events/{{{{ event.id }}}}"},
    )


def deployments(args: argparse.Namespace) -> list[Any]:
    """The seven deployments, from the parsed command line."""
    from prefect.types.entrypoint import EntrypointType

    from prefect_roboflow.flows import (
        auto_label,
        classify_images,
        curate_images,
        detect_crop_classify,
        embed_images,
        monitor_drift,
        search_images,
    )
    from prefect_roboflow.flows.demo import example_spec

    out = Path(args.out).expanduser().resolve()
    images = args.images if "://" in args.images else str(Path(args.images).expanduser().absolute())
    examples, labels = example_spec()
    common: dict[str, Any] = {"server": args.server} if args.server else {}
    schedule: dict[str, Any] = {"interval": timedelta(seconds=args.interval)} if args.interval else {"cron": args.cron}
    options: dict[str, Any] = {"name": args.name, "entrypoint_type": EntrypointType.MODULE_PATH, "tags": ["roboflow"]}
    return [
        embed_images.to_deployment(
            **options,
            **schedule,
            parameters={"images": images, "out_dir": str(out / "embed-images"), **common},
            triggers=[arrival_trigger("embed_images", str(out / "embed-images"))],
        ),
        detect_crop_classify.to_deployment(
            **options,
            parameters={
                "images": images,
                "examples": examples,
                "labels": labels,
                "out_dir": str(out / "detect-crop-classify"),
                **common,
            },
            triggers=[arrival_trigger("detect_crop_classify", str(out / "detect-crop-classify"))],
        ),
        classify_images.to_deployment(
            **options,
            parameters={"images": images, "labels": labels, "out_dir": str(out / "classify-images"), **common},
        ),
        search_images.to_deployment(
            **options,
            parameters={
                "query": labels[0],
                "embeddings_path": str(out / "embed-images" / "embeddings.parquet"),
                "top_k": 10,
                **common,
            },
        ),
        monitor_drift.to_deployment(
            **options,
            cron=args.drift_cron,
            concurrency_limit=1,  # one writer of drift.parquet at a time
            parameters={"current": images, "out_dir": str(out / "monitor-drift"), **common},
        ),
        auto_label.to_deployment(
            **options,
            parameters={
                "images": images,
                "examples": examples,
                "classes": labels,
                "out_dir": str(out / "auto-label"),
                "formats": ["coco", "label_studio", "cvat"],
                **common,
            },
            triggers=[drift_trigger(str(out / "auto-label"))],
        ),
        curate_images.to_deployment(
            **options,
            concurrency_limit=1,  # one curation at a time: each holds its rows' sketches in memory
            parameters={
                "source": str(out / "embed-images" / "embeddings.parquet"),
                "out_dir": str(out / "curate-images"),
            },
            triggers=[embedded_trigger(str(out / "curate-images"))],
        ),
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line, with defaults from the environment."""
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=env("IMAGES_DIR", "images"), help="folder or glob to embed ($IMAGES_DIR)")
    parser.add_argument("--out", default=env("OUT_DIR", "out"), help="output root ($OUT_DIR)")
    parser.add_argument("--server", default=env("INFERENCE_SERVER_URL"), help="inference server URL or block name")
    parser.add_argument("--name", default=env("DEPLOYMENT_NAME", "local"), help="deployment name ($DEPLOYMENT_NAME)")
    parser.add_argument("--cron", default=env("EMBED_CRON", "0 2 * * *"), help="embed-images schedule ($EMBED_CRON)")
    parser.add_argument("--interval", type=float, default=float(env("EMBED_INTERVAL") or 0) or None,
                        help="embed-images every N seconds instead of the cron ($EMBED_INTERVAL)")  # fmt: skip
    parser.add_argument("--drift-cron", default=env("DRIFT_CRON", "30 2 * * *"),
                        help="monitor-drift schedule ($DRIFT_CRON)")  # fmt: skip
    parser.add_argument("--limit", type=int, default=int(env("SERVE_LIMIT", "2")), help="concurrent runs at most")
    poll = float(env("PREFECT_RUNNER_POLL_FREQUENCY") or DEFAULT_POLL_SECONDS)
    parser.add_argument("--poll", type=float, default=poll, help="seconds between polls for runs to start "
                        "($PREFECT_RUNNER_POLL_FREQUENCY)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Serve until interrupted (Ctrl-C pauses the schedules)."""
    from prefect import serve

    args = parse_args(argv)
    serve(*deployments(args), limit=args.limit, query_seconds=args.poll)


if __name__ == "__main__":
    main()
