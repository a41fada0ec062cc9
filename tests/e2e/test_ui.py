"""The Prefect UI in a real browser: the page of a flow run that a webhook started.

Opens ``/runs/flow-run/<id>`` of the real server in headless Debian chromium, waits for what the
UI renders from its API calls, and checks the page shows the run (its name, state, deployment
and the automation that started it), its task runs by name on the Task Runs tab, and our
artifacts by key on the Artifacts tab. The screenshots stay in test-artifacts/ui/.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from _browser import Chromium
from _e2e import UI_ARTIFACTS, PrefectServer, TriggeredRun
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.server]


def test_flow_run_page_shows_task_runs_and_artifacts(
    embed_webhook_run: TriggeredRun, prefect_server: PrefectServer, tmp_path: Path
) -> None:
    run = embed_webhook_run.flow_run
    api = prefect_server.api
    task_runs = api.task_run_names(run["id"], 4)
    artifact_keys = sorted(a["key"] for a in api.artifacts(run["id"]) if a["key"])
    assert len(task_runs) == 4 and artifact_keys == ["embed-images-steps", "embed-images-summary"]
    shutil.rmtree(UI_ARTIFACTS, ignore_errors=True)
    url = f"{prefect_server.url}/runs/flow-run/{run['id']}"

    with Chromium(tmp_path / "chromium-profile") as browser:
        browser.goto(url)
        header = browser.wait_for_text(
            [run["name"], "Completed", "4 Task runs", "embed_images when images arrive", "Task Runs", "Artifacts"], 90
        )
        assert "Can't connect to Server API" not in header
        browser.wait_for_text(["Beginning flow run", *task_runs], 60)  # the Logs tab, by task run
        time.sleep(1.5)  # let the timeline (task runs drawn on a canvas) finish its animation
        overview = browser.screenshot(UI_ARTIFACTS / "flow-run.png")

        browser.click_text("Task Runs")
        browser.wait_for_text(["4 Task runs", "(4 Completed)", *task_runs], 60)
        browser.screenshot(UI_ARTIFACTS / "flow-run-task-runs.png")

        browser.click_text("Artifacts")
        artifacts_text = browser.wait_for_text([*artifact_keys, "Embedded 5 of 5 images"], 60)
        assert "TABLE" in artifacts_text and "MARKDOWN" in artifacts_text and "PROGRESS" in artifacts_text
        browser.screenshot(UI_ARTIFACTS / "flow-run-artifacts.png")

    for name in ("flow-run.png", "flow-run-task-runs.png", "flow-run-artifacts.png"):
        with Image.open(UI_ARTIFACTS / name) as shot:
            assert shot.format == "PNG" and shot.size == (1400, 900)
            assert len(shot.convert("L").getcolors(1 << 16) or []) > 50  # a rendered page, not a blank one
    assert overview.stat().st_size > 20_000
