"""The webhook's task path end to end: the receiver (``webhook.py --via task-worker``), a Prefect
task worker (``serve.py --task-worker``) and a real ``prefect server start`` on PostgreSQL, all on
loopback, the worker's inference server behind a fault proxy so that a test can hold a request
mid-flight.

Proves: a signed delivery is answered 202 with its task run, which the worker runs through the
public steps into ``delivery-<id>.parquet``, the embeddings those of the `Clip` block for the same
bytes, a missing image a failed row with its reason; the task run and its step runs are in Prefect
under their names; a bad parameter fails the task run with the flow's typed error naming it and
keeps the delivery in the journal's ``failed/``; detect_crop_classify on the task path writes the
deployment path's rows for the same scenes from the same cache; 20 concurrent deliveries all land,
each (delivery, image) once in the folder read as one table; and a delivery whose worker is
SIGKILLed mid-request runs once the worker is restarted, its rows exactly once, the dead run marked
Crashed. The journal's rules (what the sweep submits again, and when) are tested in-process too,
against a clock the test sets, with real files and real locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import webhook
from _e2e import (
    DEPLOYMENTS,
    REPO,
    PrefectServer,
    Served,
    TaskWorker,
    TriggeredRun,
    WebhookReceiver,
    base_env,
    wait_for,
    wait_for_triggered_run,
)
from journal import Entry, Journal, Sweeper
from support.fault_proxy import Fault, FaultProxy
from support.images import make_image, make_scene
from support.postgres import postgres_cluster

# --- the processes ------------------------------------------------------------------------------

#: Where the worker puts each flow's delivery parts (under its out folder).
TABLES = {
    "embed_images": ("embed-images", "embeddings"),
    "detect_crop_classify": ("detect-crop-classify", "detections"),
}


@dataclass
class TaskPathStack:
    """The task path's processes, and the proxy in front of the worker's inference server."""

    root: Path
    worker: TaskWorker
    receiver: WebhookReceiver
    proxy: FaultProxy
    server: PrefectServer

    @property
    def journal(self) -> Journal:
        return Journal(self.worker.state / "deliveries")

    def table(self, flow: str, delivery_id: str) -> Path:
        key, name = TABLES[flow]
        return self.worker.out / key / "deliveries" / name / f"delivery-{delivery_id}.parquet"

    def wait_for_table(self, flow: str, delivery_id: str, timeout: float = 180) -> Path:
        path = self.table(flow, delivery_id)
        logs = (self.worker.process, self.receiver.process, self.server.process)
        return wait_for(lambda: path if path.exists() else None, timeout, f"the table of {delivery_id}", *logs)

    def wait_until_done(self, delivery_id: str, timeout: float = 120) -> None:
        """Until the journal has no entry for the delivery (it ran, or failed)."""
        logs = (self.worker.process, self.receiver.process)
        wait_for(lambda: self.journal.read(delivery_id) is None, timeout, f"delivery {delivery_id} done", *logs)

    def task_run(
        self, task_run_id: str, states: tuple[str, ...] = ("COMPLETED", "FAILED", "CRASHED")
    ) -> dict[str, Any]:
        """The task run, once Prefect has recorded it in one of ``states``."""

        def recorded() -> dict[str, Any] | None:
            response = self.server.api.http.get(f"/task_runs/{task_run_id}")
            run = response.json() if response.status_code == 200 else None
            state = (run or {}).get("state") or {}  # a run being recorded can be read without its state
            return run if state.get("type") in states else None

        return wait_for(recorded, 60, f"task run {task_run_id} in {states}", self.server.process)

    def worker_lines(self, delivery_id: str) -> list[str]:
        return [
            line
            for log in sorted(self.root.glob("task-worker-*.log"))
            for line in log.read_text(errors="replace").splitlines()
            if f"delivery {delivery_id}:" in line
        ]


@pytest.fixture(scope="module")
def task_path(prefect_server: PrefectServer, inference_url: str, e2e_root: Path) -> Iterator[TaskPathStack]:
    """A task worker (through a fault proxy) and a receiver handing off to it, sweeping every second,
    on a Prefect server of their own backed by PostgreSQL.

    PostgreSQL, as `deployments/README.md` asks of a task path taking bursts: on the session's
    SQLite-backed server (shared with serve.py), a loaded CI machine kept the database locked past
    the receiver's `BUSY_RETRY_SECONDS`, and deliveries of the 20 posted at once were answered 503.
    The worker and the receiver keep the session server's PREFECT_HOME, where the content cache is,
    so that detect_crop_classify on the task path can be compared with the deployment path's run.
    """
    root = e2e_root / "task-path"
    root.mkdir()
    with contextlib.ExitStack() as stack:
        database = stack.enter_context(postgres_cluster())
        own = PrefectServer.start(
            root, PREFECT_API_DATABASE_CONNECTION_URL=database.url, PREFECT_LOGGING_LEVEL="WARNING"
        )
        stack.callback(own.process.stop)
        server = dataclasses.replace(own, home=prefect_server.home)  # its API; the session's files
        proxy = stack.enter_context(FaultProxy(inference_url))
        path: TaskPathStack | None = None
        worker = TaskWorker.start(server, root, root / "out", root / "state", proxy.url)
        stack.callback(worker.process.stop)  # the first one's group, also when the kill test replaced it
        stack.callback(lambda: (path.worker if path else worker).process.stop(grace=30))  # as replaced
        options = ("--via", "task-worker", "--state", str(worker.state), "--sweep", "1")
        receiver = WebhookReceiver.start(server, root, *options)
        stack.callback(receiver.process.stop)
        path = TaskPathStack(root, worker, receiver, proxy, server)
        yield path


def _new_images(folder: Path, count: int, seed: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"new_{seed + i}_{uuid4().hex[:6]}.png"
        path.write_bytes(make_image(seed + i))
        paths.append(str(path))
    return paths


def _accepted(response: Any) -> dict[str, Any]:
    assert response.status_code == 202, response.text
    answer: dict[str, Any] = response.json()
    return answer


# --- the task path, end to end -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.server
def test_a_delivery_runs_on_the_task_worker(task_path: TaskPathStack, inference_url: str, tmp_path: Path) -> None:
    from prefect_roboflow.blocks import Clip, InferenceServer

    images = _new_images(tmp_path, 3, 31_000)
    missing = str(tmp_path / "never-written.png")
    answer = _accepted(task_path.receiver.post_signed({"images": [*images, missing], "flow": "embed_images"}))
    assert set(answer) == {"delivery_id", "task_run_id", "flow", "images"} and answer["images"] == 4
    delivery_id = answer["delivery_id"]

    rows = pq.read_table(task_path.wait_for_table("embed_images", delivery_id)).to_pylist()
    assert [r["image_ref"] for r in rows] == [*images, missing]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]
    assert "not found" in rows[3]["error"] and rows[3]["embedding"] is None
    # the oracle: the Clip block on the same bytes, straight to the server (no steps, cache or worker)
    expected = Clip(server=InferenceServer(api_url=inference_url)).embed_images([Path(p).read_bytes() for p in images])
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows[:3]]), expected, rtol=0, atol=1e-5)
    assert all(r["model"] == "clip" and r["frame_index"] is None for r in rows)

    run = task_path.task_run(answer["task_run_id"])
    assert run["state"]["type"] == "COMPLETED" and run["name"] == f"embed_images delivery {delivery_id}"
    task_path.wait_until_done(delivery_id)
    assert task_path.journal.pending() == [] and delivery_id not in task_path.journal.failed()
    # the steps are task runs of their own, inside the delivery's (as in a flow run)
    step_runs = task_path.server.api.post("/task_runs/filter", {"task_runs": {"name": {"like_": "embed[clip"}}})
    inside = [t for t in step_runs if any(p["id"] == run["id"] for p in t["task_inputs"].get("__parents__", []))]
    assert [t["name"] for t in inside] == ["embed[clip ViT-B-16] batch 1/1"]


@pytest.mark.slow
@pytest.mark.server
def test_a_bad_parameter_fails_the_task_run_naming_it(task_path: TaskPathStack, tmp_path: Path) -> None:
    images = _new_images(tmp_path, 1, 31_100)
    body = {"images": images, "flow": "embed_images", "parameters": {"version": " "}}
    answer = _accepted(task_path.receiver.post_signed(body))  # a version is text: the flow's contract says which
    run = task_path.task_run(answer["task_run_id"])
    assert run["state"]["type"] == "FAILED"
    assert "version" in run["state"]["message"], run["state"]["message"]
    failed = wait_for(lambda: task_path.journal.failed().get(answer["delivery_id"]), 30, "the failed delivery")
    assert failed["error"].startswith("FlowParameterError: version")
    assert not task_path.table("embed_images", answer["delivery_id"]).exists()


@pytest.mark.slow
@pytest.mark.server
def test_detect_crop_classify_on_the_task_path_writes_the_deployment_path_rows(
    task_path: TaskPathStack,
    served: Served,
    embed_webhook_run: TriggeredRun,  # after the schedule is paused
    webhook_receiver: WebhookReceiver,
    prefect_server: PrefectServer,
    tmp_path: Path,
) -> None:
    scenes = []
    for i in range(2):
        (tmp_path / f"scene_{i}.png").write_bytes(make_scene(310 + i))
        scenes.append(str(tmp_path / f"scene_{i}.png"))
    payload = {"images": scenes, "flow": "detect_crop_classify", "parameters": {"min_score": -1}}
    # the deployment path first: its run fills the content cache the task worker shares
    event_id = _accepted(webhook_receiver.post_signed(payload))["event_id"]
    deployment = served.deployments["detect-crop-classify"]
    run = wait_for_triggered_run(prefect_server.api, deployment["id"], event_id, 240, served.process)
    assert run["state_type"] == "COMPLETED", run["state"]
    flow_rows = pq.read_table(served.out / "detect-crop-classify" / "events" / event_id / "detections.parquet")

    delivery_id = _accepted(task_path.receiver.post_signed(payload))["delivery_id"]
    task_rows = pq.read_table(task_path.wait_for_table("detect_crop_classify", delivery_id))
    assert set(flow_rows.column_names) <= set(task_rows.column_names)
    extra = set(task_rows.column_names) - set(flow_rows.column_names)
    assert extra == {"frame_index", "frame_time_s", "tracker_id"}  # the video columns, null for photos
    assert all(task_rows.column(c).null_count == task_rows.num_rows for c in extra)
    assert task_rows.select(flow_rows.column_names).to_pylist() == flow_rows.to_pylist()
    assert any(r["detection_index"] is not None for r in flow_rows.to_pylist())
    # the same cache: the worker sent the server nothing for these scenes
    task_path.wait_until_done(delivery_id)
    (line,) = task_path.worker_lines(delivery_id)
    assert "(0 request(s)," in line, line
    annotated = task_path.worker.out / "detect-crop-classify" / "deliveries" / "annotated"
    assert len([p for p in annotated.iterdir() if p.name.startswith("scene_")]) == 2


@pytest.mark.slow
@pytest.mark.server
def test_twenty_concurrent_deliveries_all_land(task_path: TaskPathStack, tmp_path: Path) -> None:
    batches = [_new_images(tmp_path / f"d{i}", 2, 32_000 + 10 * i) for i in range(20)]
    answers: list[Any] = [None] * 20

    def post(i: int) -> None:
        answers[i] = task_path.receiver.post_signed({"images": batches[i], "flow": "embed_images"})

    threads = [threading.Thread(target=post, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    ids = [_accepted(a)["delivery_id"] for a in answers]
    assert len(set(ids)) == 20
    for delivery_id in ids:
        task_path.wait_for_table("embed_images", delivery_id, timeout=300)
    folder = task_path.table("embed_images", ids[0]).parent
    table = ds.dataset(folder, format="parquet").to_table(columns=["image_ref", "status"])
    sent = {ref for batch in batches for ref in batch}
    refs = [r for r in table.column("image_ref").to_pylist() if r in sent]
    assert sorted(refs) == sorted(sent)  # every (delivery, image) once
    assert set(table.filter(ds.field("image_ref").isin(list(sent))).column("status").to_pylist()) == {"ok"}
    for delivery_id in ids:
        task_path.wait_until_done(delivery_id)


@pytest.mark.slow
@pytest.mark.server
def test_a_delivery_survives_its_worker_being_killed_mid_task(task_path: TaskPathStack, tmp_path: Path) -> None:
    images = _new_images(tmp_path, 3, 33_000)
    task_path.proxy.clear()
    task_path.proxy.inject(Fault.stall(600), path_prefix="/clip")  # the worker's embed request hangs
    answer = _accepted(task_path.receiver.post_signed({"images": images, "flow": "embed_images"}))
    delivery_id, first_run = answer["delivery_id"], answer["task_run_id"]
    worker = task_path.worker
    wait_for(lambda: task_path.proxy.count("/clip") >= 1, 120, "the worker's request", worker.process)
    claim = json.loads((task_path.journal.folder / f"{delivery_id}.lock").read_text())
    assert claim["task_run_id"] == first_run and claim["pid"] == worker.process.popen.pid

    worker.kill()  # mid-task: it has claimed the delivery and waits for the server's answer
    assert not task_path.table("embed_images", delivery_id).exists()
    assert task_path.journal.read(delivery_id) is not None  # acknowledged (202), not yet run
    task_path.worker = TaskWorker.start(task_path.server, task_path.root, worker.out, worker.state,
                                        task_path.proxy.url)  # fmt: skip

    rows = pq.read_table(task_path.wait_for_table("embed_images", delivery_id)).to_pylist()
    assert sorted(r["image_ref"] for r in rows) == sorted(images)  # each image exactly once
    assert all(r["status"] == "ok" for r in rows)
    task_path.wait_until_done(delivery_id)
    log = task_path.receiver.process.log.read_text(errors="replace")
    again = re.search(
        rf"delivery {delivery_id} submitted again as task run (\S+): task run {first_run} was claimed", log
    )
    assert again, log[-3000:]
    assert task_path.task_run(first_run)["state"]["type"] == "CRASHED"
    assert task_path.task_run(again.group(1))["state"]["type"] == "COMPLETED"
    parts = sorted(p.name for p in task_path.table("embed_images", delivery_id).parent.glob(f"*{delivery_id}*"))
    assert parts == [f"delivery-{delivery_id}.parquet"]


@pytest.mark.slow
@pytest.mark.server
def test_the_ui_shows_a_delivery_as_a_task_run(task_path: TaskPathStack, tmp_path: Path) -> None:
    from _browser import Chromium
    from PIL import Image

    images = _new_images(tmp_path, 2, 34_000)
    answer = _accepted(task_path.receiver.post_signed({"images": images, "flow": "embed_images"}))
    delivery_id, run_id = answer["delivery_id"], answer["task_run_id"]
    run = task_path.task_run(run_id, ("COMPLETED",))
    shots = REPO / "test-artifacts" / "ui-task-path"
    shots.mkdir(parents=True, exist_ok=True)
    with Chromium(tmp_path / "chromium-profile") as browser:
        browser.goto(f"{task_path.server.url}/runs/task-run/{run_id}")
        page = browser.wait_for_text([run["name"], "Completed", f"delivery {delivery_id}: 2 image(s), 0 failed"], 90)
        assert "Can't connect to Server API" not in page
        shot = browser.screenshot(shots / "task-run.png")
    with Image.open(shot) as image:
        assert image.format == "PNG" and len(image.convert("L").getcolors(1 << 16) or []) > 50


# --- the journal's rules, in-process ----------------------------------------------------------------


class FakePrefect:
    """What the sweep asks of Prefect, kept in a dict: task runs and their states, submissions, marks."""

    def __init__(self) -> None:
        self.states: dict[str, str] = {}
        self.submitted: list[tuple[str, str]] = []
        self.marked: list[tuple[str, str]] = []
        self.refuse = False

    async def lookup(self, task_run_id: str) -> str | None:
        return self.states.get(task_run_id)

    async def submit(self, delivery: dict[str, Any], task_run_id: str) -> None:
        if self.refuse:
            raise RuntimeError("Prefect is down")
        self.submitted.append((delivery["id"], task_run_id))
        self.states[task_run_id] = "SCHEDULED"

    async def mark(self, task_run_id: str, state: str, message: str) -> None:
        self.marked.append((task_run_id, state))
        self.states[task_run_id] = state


@dataclass
class Clocked:
    journal: Journal
    prefect: FakePrefect
    sweeper: Sweeper
    now: list[float]

    def record(self, delivery_id: str) -> str:
        return asyncio.run(self.sweeper.record({"id": delivery_id, "flow": "embed_images", "images": ["a.png"]}))

    def sweep(self) -> list[tuple[str, str]]:
        return asyncio.run(self.sweeper.sweep())

    def run_of(self, delivery_id: str) -> str:
        entry = self.journal.read(delivery_id)
        assert entry is not None
        return entry.task_run_id


@pytest.fixture()
def clocked(tmp_path: Path) -> Clocked:
    journal, prefect, now = Journal(tmp_path / "deliveries"), FakePrefect(), [1_700_000_000.0]
    sweeper = Sweeper(journal, prefect.lookup, prefect.submit, prefect.mark, grace=30, stale=600, clock=lambda: now[0])
    return Clocked(journal, prefect, sweeper, now)


def test_a_hand_off_is_in_the_journal_before_its_run_and_gone_if_the_run_is_refused(clocked: Clocked) -> None:
    run = clocked.record("d1")
    assert clocked.prefect.submitted == [("d1", run)]
    entry = clocked.journal.read("d1")
    assert entry == Entry({"id": "d1", "flow": "embed_images", "images": ["a.png"]}, run, clocked.now[0], 1)
    clocked.prefect.refuse = True
    with pytest.raises(RuntimeError, match="Prefect is down"):
        clocked.record("d2")
    assert clocked.journal.pending() == ["d1"]


def test_a_queued_run_is_left_until_it_is_stale_then_queued_again(clocked: Clocked) -> None:
    first = clocked.record("d1")
    assert clocked.sweep() == []
    clocked.now[0] += 599
    assert clocked.sweep() == []
    clocked.now[0] += 1
    ((delivery_id, what),) = clocked.sweep()
    assert delivery_id == "d1" and what.startswith("submitted again: task run") and "queued for 600 s" in what
    assert clocked.prefect.marked == [(first, "CANCELLED")] and clocked.run_of("d1") != first
    assert getattr(clocked.journal.read("d1"), "attempts", None) == 2


def test_a_run_claimed_by_a_worker_that_is_gone_is_submitted_again_at_once(clocked: Clocked) -> None:
    first = clocked.record("d1")
    clocked.prefect.states[first] = "RUNNING"
    with clocked.journal.claim("d1", first) as entry:  # a worker claims it...
        assert entry is not None
        assert clocked.sweep() == []  # ...and holds the lock: nobody touches it
    # the worker's lock is gone, its claim stays: it died before it finished
    (acted,) = clocked.sweep()
    assert "was claimed by a worker that stopped before it finished" in acted[1]
    assert clocked.prefect.marked == [(first, "CRASHED")]
    second = clocked.run_of("d1")
    with clocked.journal.claim("d1", first) as stale:  # the old run, if it ever went on, does nothing
        assert stale is None
    with clocked.journal.claim("d1", second) as entry:
        assert entry is not None
        clocked.journal.done("d1")
    with clocked.journal.claim("d1", second) as gone:
        assert gone is None
    assert clocked.journal.pending() == [] and clocked.sweep() == []


def test_a_run_pending_without_a_claim_is_submitted_again_after_the_grace(clocked: Clocked) -> None:
    first = clocked.record("d1")
    clocked.prefect.states[first] = "PENDING"
    assert clocked.sweep() == []
    clocked.now[0] += 29
    assert clocked.sweep() == []
    clocked.now[0] += 1
    (acted,) = clocked.sweep()
    assert "has been PENDING for 30 s without a worker claiming it" in acted[1]


@pytest.mark.parametrize(
    ("state", "expected"),
    [(None, "is not in Prefect"), ("COMPLETED", "ended COMPLETED without running it"), ("FAILED", "ended FAILED")],
)
def test_a_run_gone_or_ended_without_running_the_delivery_is_submitted_again(
    clocked: Clocked, state: str | None, expected: str
) -> None:
    first = clocked.record("d1")
    if state is None:
        del clocked.prefect.states[first]
    else:
        clocked.prefect.states[first] = state
    (acted,) = clocked.sweep()
    assert expected in acted[1] and clocked.run_of("d1") != first


def test_a_run_cancelled_in_prefect_keeps_its_delivery_in_failed(clocked: Clocked) -> None:
    first = clocked.record("d1")
    clocked.prefect.states[first] = "CANCELLED"
    (acted,) = clocked.sweep()
    assert acted[1].startswith("dropped: ")
    assert clocked.journal.pending() == [] and "cancelled in Prefect" in clocked.journal.failed()["d1"]["error"]
    assert len(clocked.prefect.submitted) == 1


def test_a_delivery_submitted_too_often_goes_to_failed(clocked: Clocked) -> None:
    clocked.record("d1")
    for _ in range(4):  # 5 submissions in all
        del clocked.prefect.states[clocked.run_of("d1")]
        assert clocked.sweep()[0][1].startswith("submitted again")
    del clocked.prefect.states[clocked.run_of("d1")]
    assert clocked.sweep()[0][1].startswith("failed: ")
    assert clocked.journal.failed()["d1"]["error"].startswith("submitted 5 times")
    assert len(clocked.prefect.submitted) == 5


def test_when_a_worker_dies_its_unclaimed_runs_are_submitted_again_once(clocked: Clocked) -> None:
    queued = clocked.record("d1")  # Scheduled: it may have been handed to the worker that dies
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from journal import Journal; "
        "Journal(sys.argv[2]).register_worker(); print('up', flush=True); time.sleep(600)"
    )
    worker = subprocess.Popen([sys.executable, "-c", code, str(DEPLOYMENTS), str(clocked.journal.folder)],
                              stdout=subprocess.PIPE, text=True, env=base_env())  # fmt: skip
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "up"
        assert clocked.sweep() == [] and clocked.journal.dead_workers() == []  # alive: its lock is held
        clocked.now[0] += 1
        pending = clocked.record("d2")
        clocked.prefect.states[pending] = "PENDING"  # its Pending event came in, its claim never did
        worker.kill()
        worker.wait(timeout=30)
    finally:
        worker.kill()
    clocked.now[0] += 1
    acted = clocked.sweep()
    assert [a[0] for a in acted] == ["d1", "d2"]
    assert all("a task worker stopped after task run" in a[1] for a in acted)
    assert clocked.prefect.marked == [(queued, "CRASHED"), (pending, "CRASHED")]
    assert os.listdir(clocked.journal.workers_folder) == []
    clocked.now[0] += 1
    clocked.record("d3")  # after the death: only the grace and stale rules apply to it
    assert clocked.sweep() == []  # and only once: the runs submitted again came after the death


def _locks(journal: Journal) -> list[str]:
    return sorted(p.name for p in journal.folder.glob("*.lock"))


def test_a_sweep_leaves_no_lock_file_of_a_delivery_done_after_its_listing(
    clocked: Clocked, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = {d: clocked.record(d) for d in ("d0", "d1", "d2")}
    listing = clocked.journal.pending

    def listed_then_done() -> list[str]:  # each delivery's worker finishes just after the sweep lists it
        ids = listing()
        for delivery_id in ids:
            with clocked.journal.claim(delivery_id, runs[delivery_id]) as entry:
                assert entry is not None
                clocked.journal.done(delivery_id)
        return ids

    monkeypatch.setattr(clocked.journal, "pending", listed_then_done)
    assert clocked.sweep() == []
    assert _locks(clocked.journal) == [] and listing() == []


def test_sweeps_racing_with_finishing_workers_leave_no_lock_files(clocked: Clocked) -> None:
    """Two worker threads claim and finish 200 deliveries while the sweep runs again and again:
    every sweep that takes a lock after its delivery finished removes the lock file it made."""
    runs = {f"d{n}": clocked.record(f"d{n}") for n in range(200)}
    claimed: list[bool] = []

    def work(ids: list[str]) -> None:
        for delivery_id in ids:
            with clocked.journal.claim(delivery_id, runs[delivery_id]) as entry:
                claimed.append(entry is not None)
                clocked.journal.done(delivery_id)

    ids = list(runs)
    workers = [threading.Thread(target=work, args=(ids[w::2],)) for w in range(2)]
    for worker in workers:
        worker.start()
    while True:  # sweeps while the workers finish deliveries (all Scheduled: none is acted on)
        assert clocked.sweep() == []
        if not any(worker.is_alive() for worker in workers):
            break
    for worker in workers:
        worker.join()
    assert claimed == [True] * 200 and clocked.journal.pending() == []
    assert _locks(clocked.journal) == []


def test_the_task_path_modules_are_light() -> None:
    # the receiver imports task_worker (and journal) to submit: neither loads the flows or the image stack
    code = "import sys, task_worker; print(sorted(m for m in ('prefect_roboflow', 'numpy', 'PIL') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=DEPLOYMENTS, capture_output=True, text=True, timeout=120,
                          env=base_env())  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_receiver_answers_202_with_the_task_run_or_503_when_it_cannot_hand_off() -> None:
    import httpx

    handed: list[tuple[str, list[str]]] = []
    down = [False]

    async def hand_off(arrived: webhook.ImagesArrived, delivery_id: str) -> str:
        if down[0]:
            raise RuntimeError("Prefect is down")
        handed.append((delivery_id, arrived.images))
        return "run-1"

    app = webhook.create_app(secret="s" * 32, hand_off=hand_off)
    body = json.dumps({"images": ["a.png"]}).encode()

    async def post(headers: dict[str, str]) -> httpx.Response:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://webhook") as client:
                sent = {"content-type": "application/json", **headers}
                return await client.post("/webhooks/images", content=body, headers=sent)

    headers = webhook.signature_headers(body, "s" * 32, delivery_id="d-7")
    down[0] = True
    refused = asyncio.run(post(headers))
    assert refused.status_code == 503 and handed == []
    down[0] = False
    answer = asyncio.run(post(headers))  # the same delivery id, sent again: accepted now
    assert answer.status_code == 202
    assert answer.json() == {"delivery_id": "d-7", "task_run_id": "run-1", "flow": "embed_images", "images": 1}
    assert handed == [("d-7", ["a.png"])]


@pytest.mark.parametrize(
    ("status", "failing", "tries", "succeeds"),
    [(503, 2, 3, True), (503, 5, 6, True), (429, 2, 3, True), (500, 2, 3, True), (500, 9, 3, False),
     (404, 2, 1, False), (422, 2, 1, False)],
)  # fmt: skip
def test_the_receiver_tries_a_busy_prefect_again_and_a_refusal_once(
    tmp_path: Path, status: int, failing: int, tries: int, succeeds: bool
) -> None:
    # creating the run is idempotent (a fixed id and key), so busy answers are tried again at once, a
    # 500 three times in all (it may be a bug that stays); an answer that the request is wrong is raised
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError
    from task_worker import TaskPath

    calls = []

    async def call() -> str:
        calls.append(status)
        if len(calls) <= failing:
            request = httpx.Request("POST", "http://prefect/api/task_runs/")
            raise PrefectHTTPStatusError.from_httpx_error(
                httpx.HTTPStatusError("no", request=request, response=httpx.Response(status, request=request))
            )
        return "run"

    tried = TaskPath(str(tmp_path))._busy_retried(call)
    if not succeeds:
        with pytest.raises(PrefectHTTPStatusError):
            asyncio.run(tried)
    else:
        assert asyncio.run(tried) == "run"
    assert len(calls) == tries
