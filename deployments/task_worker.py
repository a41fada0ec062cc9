"""The task path: a long-lived Prefect task worker runs each delivery the webhook receiver hands it.

    export PREFECT_API_URL=http://127.0.0.1:4200/api
    OUT_DIR=/data/roboflow INFERENCE_SERVER_URL=http://127.0.0.1:9001 python deployments/serve.py --task-worker
    python deployments/webhook.py --via task-worker --port 8787

The receiver writes each signed delivery to its journal (``journal.py``), submits `webhook_delivery`
as a Prefect background task run (``Task.apply_async``) and answers 202. The worker
(``prefect.task_worker.serve``) is subscribed to those runs on the Prefect server's websocket and
starts one within milliseconds, in a process whose modules, HTTP engine and API client are already
warm: no deployment trigger, no poll, no new process. It runs the images through the flow's public
steps (`prefect_roboflow.flows.deliveries.run_delivery`) and publishes the rows as
``OUT_DIR/<flow>/deliveries/<table>/delivery-<id>.parquet``. Each delivery is a task run in the
UI (``embed_images delivery <id>``), its steps task runs inside it.

What the receiver and the workers must share:

- the Prefect API (``PREFECT_API_URL``);
- Prefect's task-scheduling storage, where a background task run's parameters are kept (the API
  holds only their key): on one machine the same ``PREFECT_HOME`` (or
  ``PREFECT_RESULTS_LOCAL_STORAGE_PATH``); across machines
  ``PREFECT_TASKS_SCHEDULING_DEFAULT_STORAGE_BLOCK`` naming a shared file-system block (an S3 bucket);
- the journal folder (``webhook.py --state``): the same path, with POSIX locks (one machine, or NFSv4);
- the images' paths, as for the flows.

This module imports Prefect only: the receiver imports it to submit runs; the worker imports the
flows when it starts.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID, uuid4

from journal import Journal, Sweeper
from prefect import task
from prefect.cache_policies import NO_CACHE

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient
    from prefect.context import SettingsContext
    from prefect.results import ResultStore
    from prefect.settings import Settings
    from prefect.states import State

#: Deliveries one worker runs at once (Prefect's default for a task worker).
DEFAULT_LIMIT = 10
#: How long the receiver keeps trying a busy Prefect server (503, 429) before answering 503 itself.
BUSY_RETRY_SECONDS = 30.0
#: How many times in all it sends a request Prefect answers 500 (an overload, or a bug that stays).
TRIES_ON_500 = 3
T = TypeVar("T")
#: The receiver's state folder, shared with the workers (``webhook.py --state``).
STATE_ENV = "PREFECT_ROBOFLOW_WEBHOOK_STATE"


@dataclass
class WorkerSettings:
    """What the worker runs deliveries with: its own outputs, server and cache, as serve.py's deployments."""

    out: str = field(default_factory=lambda: os.environ.get("OUT_DIR", "out"))
    server: str | None = field(default_factory=lambda: os.environ.get("INFERENCE_SERVER_URL"))
    cache_storage: str | None = None
    max_failure_rate: float = 0.5
    examples: list[dict[str, Any]] | None = None  # detect_crop_classify's: the bundled ones unless given
    labels: list[str] | None = None
    state: str | None = None  # the receiver's state folder (its journal): webhook.py's default unless given


_settings: WorkerSettings | None = None
#: Where this worker is registered as live (`Journal.register_worker`): the journal it serves.
_registered: Journal | None = None


def _delivery_name() -> str:
    from prefect.runtime import task_run

    delivery = task_run.parameters.get("delivery") or {}
    return f"{delivery.get('flow', 'delivery')} delivery {delivery.get('id', '?')}"


@task(name="webhook-delivery", task_run_name=_delivery_name, cache_policy=NO_CACHE)
def webhook_delivery(delivery: dict[str, Any], journal: str) -> dict[str, Any]:
    """Run one delivery the receiver acknowledged (``{"id", "flow", "images", "parameters"}``),
    unless its journal entry says it is done or now another task run's; then mark it done.

    A run that raises leaves the delivery in the journal's ``failed/`` folder with the error (its
    rows, if any were published, stay). More failed images than ``max_failure_rate`` fail the task
    run after the rows are published, as a flow run fails.
    """
    from prefect.logging import get_run_logger
    from prefect.runtime import task_run

    from prefect_roboflow.flows.deliveries import run_delivery

    settings = _settings or WorkerSettings()
    logger = get_run_logger()
    book, delivery_id = Journal(journal), str(delivery["id"])
    if _registered is not None and _registered.folder != book.folder:
        logger.warning(
            "this worker is registered in %s, the delivery's journal is %s: give the receiver and the workers "
            "the same --state, or that receiver's sweep does not see when a worker dies",
            _registered.folder, book.folder,
        )  # fmt: skip
    with book.claim(delivery_id, str(task_run.id)) as claimed:
        if claimed is None:
            logger.info("delivery %s is done or was handed to another task run: nothing to do", delivery_id)
            return {"delivery_id": delivery_id, "skipped": True}
        extra: dict[str, Any] = {}
        if delivery["flow"] == "detect_crop_classify":
            if settings.examples is None or settings.labels is None:
                warm_up(settings)  # a worker that serve_tasks did not start: the bundled examples
            extra = {"examples": settings.examples, "labels": settings.labels}
        try:
            result = run_delivery(
                delivery_id,
                delivery["flow"],
                delivery["images"],
                settings.out,
                server=settings.server,
                cache_storage=settings.cache_storage,
                max_failure_rate=settings.max_failure_rate,
                **extra,
                **delivery.get("parameters", {}),
            )
        except Exception as exc:
            book.fail(delivery_id, f"{type(exc).__name__}: {exc}")
            raise
        book.done(delivery_id)
    logger.info(
        "delivery %s: %d image(s), %d failed, %d row(s) in %s (%d request(s), %d from cache)",
        delivery_id, result.images, result.images_failed, result.rows, result.table, result.requests,
        result.from_cache,
    )  # fmt: skip
    result.check_failure_rate(settings.max_failure_rate)
    return result.model_dump()


class TaskPath:
    """The receiver's side of the task path: hands deliveries off through the journal and keeps
    sweeping it (see `journal.Sweeper`), with one Prefect client for the app's lifetime."""

    def __init__(self, state: str | None = None, grace: float = 30.0, stale: float = 600.0) -> None:
        self.journal = Journal(journal_folder(state))
        self.sweeper = Sweeper(self.journal, self.state_of, self.submit, self.mark, grace=grace, stale=stale)
        from prefect.context import get_settings_context
        from prefect.settings import PREFECT_CLIENT_MAX_RETRIES

        self._client: PrefectClient | None = None
        self._store: ResultStore | None = None
        self._settings: SettingsContext = get_settings_context()
        self._no_retries: Settings = self._settings.settings.copy_with_update(updates={PREFECT_CLIENT_MAX_RETRIES: 0})

    async def __aenter__(self) -> TaskPath:
        from prefect.client.orchestration import get_client

        self._client = get_client()
        await self._client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.__aexit__(*exc)

    @property
    def client(self) -> PrefectClient:
        assert self._client is not None, "use TaskPath as an async context manager"
        return self._client

    async def hand_off(self, delivery: dict[str, Any]) -> str:
        """The delivery in the journal, then submitted: its task run id."""
        return await self.sweeper.record(delivery)

    async def submit(self, delivery: dict[str, Any], task_run_id: str) -> None:
        """A new background task run of `webhook_delivery` for ``delivery``, with the given id.

        This is what ``webhook_delivery.apply_async(kwargs=...)`` does (``Task.create_run`` with
        ``deferred=True``: the parameters kept in the task-scheduling storage under a new key, the
        run created Scheduled with that key, the Scheduled event), on this app's open client and
        event loop, less one thing: the caller's Prefect context, which ``create_run`` serializes
        and stores beside the parameters for the worker to run under. That serialization (every
        setting, through pydantic) took ~0.2 s of CPU per call on a loaded machine, on the event
        loop; and the worker is to run deliveries with its own settings, not the receiver's.
        """
        from prefect.states import Scheduled
        from prefect.task_worker import store_parameters
        from prefect.utilities.engine import emit_task_run_state_change_event

        parameters = {"delivery": delivery, "journal": str(self.journal.folder)}
        state: State[Any] = Scheduled()
        state.state_details.deferred = True
        state.state_details.task_parameters_id = parameters_id = uuid4()
        await store_parameters(await self._parameters_store(), parameters_id, {"parameters": parameters})
        dynamic_key = f"{webhook_delivery.task_key}-{uuid4().hex}"  # the same over retries: one run
        run = await self._busy_retried(
            lambda: self.client.create_task_run(
                task=webhook_delivery,
                flow_run_id=None,
                dynamic_key=dynamic_key,
                id=UUID(task_run_id),
                name=webhook_delivery.name,
                state=state,
                task_inputs={name: [] for name in parameters},
            )
        )
        emit_task_run_state_change_event(task_run=run, initial_state=None, validated_state=run.state or state)

    async def _busy_retried(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, tried again at once (50 ms doubling to 1 s, with jitter) while Prefect answers
        503 or 429 or the connection fails, for up to `BUSY_RETRY_SECONDS`, and after a 500 (3 in all).

        A SQLite-backed Prefect server answers 503 when two writers collide (the receiver's runs,
        the workers' states and logs, its own services); Prefect's client waits 2, 4, 8... seconds
        before trying again, which made a burst of 20 deliveries take up to 29 s to be answered.
        A loaded server also answers an occasional 500 (seen on PostgreSQL, with the load average at
        18): that is tried `TRIES_ON_500` times in all, as a 500 may also be a bug that stays. The call
        creates a run with a fixed id and key, so trying it again cannot make a second one.
        """
        import httpx
        from prefect.context import SettingsContext
        from prefect.exceptions import PrefectHTTPStatusError

        deadline, pause, errors = time.monotonic() + BUSY_RETRY_SECONDS, 0.05, 0
        while True:
            with SettingsContext(profile=self._settings.profile, settings=self._no_retries):
                try:
                    return await call()
                except (PrefectHTTPStatusError, httpx.TransportError) as exc:
                    status = exc.response.status_code if isinstance(exc, PrefectHTTPStatusError) else None
                    errors += status == 500
                    busy = status in (None, 429, 503) or (status == 500 and errors < TRIES_ON_500)
                    if not busy or time.monotonic() > deadline:
                        raise
            await asyncio.sleep(pause * random.uniform(0.5, 1.5))
            pause = min(pause * 2, 1.0)

    async def _parameters_store(self) -> ResultStore:
        """Where background task runs' parameters are kept (Prefect's task-scheduling storage)."""
        from prefect.results import ResultStore, get_or_create_default_task_scheduling_storage

        if self._store is None:
            storage: Any = await get_or_create_default_task_scheduling_storage()  # a file-system block
            self._store = await ResultStore(result_storage=storage).aupdate_for_task(webhook_delivery)
        return self._store

    async def state_of(self, task_run_id: str) -> str | None:
        """A task run's state type (``"RUNNING"``...), or None when Prefect has no such run."""
        from prefect.exceptions import ObjectNotFound

        try:
            run = await self.client.read_task_run(UUID(task_run_id))
        except ObjectNotFound:
            return None
        return run.state.type.value if run.state is not None else None

    async def mark(self, task_run_id: str, state: str, message: str) -> None:
        """End an abandoned task run in Prefect, Crashed or Cancelled, with the reason."""
        from prefect.states import Cancelled, Crashed

        new: State[Any] = Crashed(message=message) if state == "CRASHED" else Cancelled(message=message)
        await self.client.set_task_run_state(UUID(task_run_id), new, force=True)

    async def sweep_forever(self, every: float) -> None:
        """Sweep the journal now and then every ``every`` seconds, until cancelled."""
        import logging

        logger = logging.getLogger("prefect_roboflow.webhook")
        while True:
            try:
                await self.sweeper.sweep()
            except Exception as exc:  # Prefect unreachable for a while: the next sweep tries again
                logger.warning("the journal sweep failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(every)


def warm_up(settings: WorkerSettings) -> float:
    """Import what a delivery's run needs before the first one arrives: seconds it took."""
    started = time.perf_counter()
    import supervision  # noqa: F401  (detect's boxes and the annotated images)

    from prefect_roboflow.flows import deliveries
    from prefect_roboflow.flows.demo import example_spec

    if settings.examples is None or settings.labels is None:
        examples, labels = example_spec()
        settings.examples = settings.examples if settings.examples is not None else examples
        settings.labels = settings.labels if settings.labels is not None else labels
    deliveries.delivery_folder(settings.out, "embed_images")
    return time.perf_counter() - started


def state_folder(state: str | None = None) -> str:
    """The receiver's state folder: given, else ``$PREFECT_ROBOFLOW_WEBHOOK_STATE``, else
    ``$PREFECT_HOME/prefect-roboflow-webhook`` (the receiver's default too)."""
    if state or os.environ.get(STATE_ENV):
        return str(state or os.environ[STATE_ENV])
    from prefect.settings import PREFECT_HOME

    return str(PREFECT_HOME.value() / "prefect-roboflow-webhook")


def journal_folder(state: str | None = None) -> str:
    """The task path's journal, in the state folder."""
    return os.path.join(state_folder(state), "deliveries")


def serve_tasks(settings: WorkerSettings | None = None, limit: int | None = DEFAULT_LIMIT) -> None:
    """Run the task worker until interrupted: ``limit`` deliveries at once (None: no limit).

    The worker registers itself as live in the journal (for as long as its process lives, so the
    receiver's sweep knows when one dies) and warms up first; ``kill -USR1`` dumps its threads.
    """
    import faulthandler
    import logging
    import signal

    from prefect.context import SyncClientContext
    from prefect.task_worker import serve

    global _settings, _registered
    _settings = settings or WorkerSettings()
    _registered = Journal(journal_folder(_settings.state))
    _registered.register_worker()  # the descriptor stays open (and locked) until the process ends
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    seconds = warm_up(_settings)
    logging.getLogger("prefect_roboflow.webhook").info(
        "task worker warmed up in %.1f s; journal %s", seconds, _registered.folder
    )
    # One sync API client for every task run of the worker (their contexts are copied from this
    # one): a task run on a worker thread otherwise opens its own, ~0.15 s of CPU for its TLS context.
    with SyncClientContext.get_or_create():
        serve(webhook_delivery, limit=limit)
