"""The receiver's durable record of the deliveries it acknowledged on the task path, until they ran.

Prefect hands a background task run to a task worker once, from a queue in the Prefect server's
memory, and the worker acknowledges it on receipt: a worker killed mid-task leaves its task run
Pending or Running for good, a worker killed just after receiving it leaves it Scheduled, and
nobody runs either again (a Prefect server restart loses its whole queue). So the receiver keeps
its own record, in a folder it shares with the task workers (the same path for all: one machine,
or a shared volume with POSIX locks)::

    <folder>/<delivery id>.json       the delivery, the task run now meant to run it, its submissions
    <folder>/<delivery id>.lock       held (flock) by whoever acts on the delivery; names the run that claimed it
    <folder>/failed/<id>.json         a delivery whose run raised, with the error, for an operator
    <folder>/workers/<host>-<pid>     held (flock) by each live task worker for its lifetime

- The receiver writes the entry, naming the task run it is about to submit (fsync'd, renamed into
  place), submits that run, and only then answers 202, all under the entry's lock.
- The worker's task takes the lock (waiting for it) and runs the delivery only if the entry still
  names *its* task run: an entry gone is done, one naming another run was submitted again. It
  writes its claim into the lock file, publishes the rows, then removes the entry (or moves it to
  ``failed/`` when the run raised), and only then lets the lock go.
- The sweep (the receiver's, every few seconds and at its start) takes each entry's lock without
  waiting: a lock held means a live process is on it (the kernel drops a dead one's locks). Under
  the lock it submits the delivery again when nothing can be running it: the run was claimed by
  a worker that is gone; Prefect has no such run, or it ended; a task worker died after the run
  was submitted and no worker has claimed it (it may have been that worker's); the run has been
  Pending or Running without a claim for ``grace`` seconds, or queued for ``stale`` seconds. The
  old run is marked Crashed (Cancelled if it was still queued); a run cancelled by someone in
  Prefect leaves its delivery in ``failed/``, not run.

A delivery's rows are one part of a dataset folder named after it (``delivery-<id>.parquet``), so a
delivery that runs twice replaces its own part: its rows are in the table once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

logger = logging.getLogger("prefect_roboflow.webhook.journal")

#: Task-run state types after which the run does nothing more.
FINAL = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})
#: Submissions of one delivery at most (the receiver's and the sweep's); then it goes to ``failed/``.
MAX_ATTEMPTS = 5


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """``path`` replaced whole by ``value``: a temp file beside it, fsync'd, renamed, the folder fsync'd."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temp.open("w") as handle:
        json.dump(value, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    _fsync_dir(path.parent)


def _lock(path: Path, wait: bool) -> int | None:
    """``path`` opened (made if missing) and locked: its descriptor, or None when someone holds
    the lock and ``wait`` is False. A file removed (and perhaps made again) while this waited is
    the wrong one: the lock is taken again on the file now at the path."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # closing drops the lock


@dataclass
class Entry:
    """One acknowledged delivery, not yet run through."""

    delivery: dict[str, Any]  # {"id", "flow", "images", "parameters", "received"}
    task_run_id: str
    submitted: float  # unix seconds of its latest submission
    attempts: int = 1

    @property
    def id(self) -> str:
        return str(self.delivery["id"])

    def dump(self) -> dict[str, Any]:
        return {
            "delivery": self.delivery,
            "task_run_id": self.task_run_id,
            "submitted": self.submitted,
            "attempts": self.attempts,
        }


class Held:
    """A delivery's lock, held: the claim in its lock file can be read and written."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def claim(self) -> str | None:
        """The task run that claimed the delivery, as its lock file says (None: none, or unreadable)."""
        raw = os.pread(self.fd, 4096, 0)
        try:
            value = json.loads(raw) if raw else {}
        except ValueError:
            return None
        return str(value["task_run_id"]) if isinstance(value, dict) and value.get("task_run_id") else None

    def set_claim(self, task_run_id: str) -> None:
        """Say in the lock file that ``task_run_id`` runs the delivery (and in which process)."""
        text = json.dumps({"task_run_id": task_run_id, "pid": os.getpid(), "host": socket.gethostname()})
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text.encode(), 0)
        os.fsync(self.fd)


class Journal:
    """The entries of a journal folder (see the module docs)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder).expanduser().resolve()
        self.failed_folder = self.folder / "failed"
        self.workers_folder = self.folder / "workers"
        for made in (self.failed_folder, self.workers_folder):
            made.mkdir(parents=True, exist_ok=True)

    def _entry(self, delivery_id: str) -> Path:
        return self.folder / f"{delivery_id}.json"

    def _lock(self, delivery_id: str) -> Path:
        return self.folder / f"{delivery_id}.lock"

    def pending(self) -> list[str]:
        """The ids of the entries now in the folder, oldest first."""
        found = []
        for path in self.folder.glob("*.json"):
            with contextlib.suppress(FileNotFoundError):  # done meanwhile
                found.append((path.stat().st_mtime, path.stem))
        return [delivery_id for _, delivery_id in sorted(found)]

    def failed(self) -> dict[str, dict[str, Any]]:
        """The deliveries whose run raised or was cancelled (in ``failed/``), by id, with their ``error``."""
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.failed_folder.glob("*.json"))}

    def read(self, delivery_id: str) -> Entry | None:
        """The entry of ``delivery_id``; None when there is none (done, or never written)."""
        try:
            value = json.loads(self._entry(delivery_id).read_text())
        except FileNotFoundError:
            return None
        return Entry(value["delivery"], value["task_run_id"], value["submitted"], value["attempts"])

    def write(self, entry: Entry) -> None:
        """Write (or replace) an entry durably; the caller holds its lock."""
        _write_json(self._entry(entry.id), entry.dump())

    @contextlib.contextmanager
    def locked(self, delivery_id: str, wait: bool = True) -> Iterator[Held | None]:
        """The delivery's lock, held for the block (None when ``wait`` is False and someone holds
        it). Waiting blocks the thread: on an event loop use `alocked`."""
        fd = _lock(self._lock(delivery_id), wait)
        if fd is None:
            yield None
            return
        try:
            yield Held(fd)
        finally:
            os.close(fd)

    @contextlib.asynccontextmanager
    async def alocked(self, delivery_id: str, every: float = 0.02) -> AsyncIterator[Held]:
        """The delivery's lock, held for the block, waited for without blocking the event loop."""
        while (fd := _lock(self._lock(delivery_id), wait=False)) is None:
            await asyncio.sleep(every)
        try:
            yield Held(fd)
        finally:
            os.close(fd)

    def done(self, delivery_id: str) -> None:
        """The delivery ran: its entry and lock file go (the caller holds the lock)."""
        self._entry(delivery_id).unlink(missing_ok=True)
        _fsync_dir(self.folder)
        self._lock(delivery_id).unlink(missing_ok=True)

    def fail(self, delivery_id: str, error: str) -> None:
        """The delivery's run raised: its entry moves to ``failed/`` with the error (the caller holds the lock)."""
        entry = self.read(delivery_id)
        if entry is not None:
            _write_json(self.failed_folder / f"{delivery_id}.json", {**entry.dump(), "error": error[:2000]})
        self.done(delivery_id)

    def forget_lock(self, delivery_id: str) -> None:
        """The lock file of a delivery found without an entry (done meanwhile) goes again: taking
        the lock made it. The caller holds that lock, so no entry can be written meanwhile (that
        needs the lock), and whoever waits on the removed file takes the lock again on a new one."""
        self._lock(delivery_id).unlink(missing_ok=True)

    @contextlib.contextmanager
    def claim(self, delivery_id: str, task_run_id: str) -> Iterator[Entry | None]:
        """For a worker's task run: the entry, with the lock held and the claim written, when the
        entry names ``task_run_id``; None when it is done (gone) or now another run's. Waits for the lock."""
        with self.locked(delivery_id) as held:
            assert held is not None
            entry = self.read(delivery_id)
            if entry is None:
                self.forget_lock(delivery_id)
            if entry is None or entry.task_run_id != task_run_id:
                yield None
                return
            held.set_claim(task_run_id)
            yield entry

    def register_worker(self) -> int:
        """Mark this process a live task worker for as long as it lives: the descriptor to keep open."""
        path = self.workers_folder / f"{socket.gethostname()}-{os.getpid()}"
        fd = _lock(path, wait=True)
        assert fd is not None
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "started": time.time()}).encode(), 0)
        return fd

    def dead_workers(self) -> list[str]:
        """The workers registered here that have died since the last look (their files are then removed)."""
        dead = []
        for path in self.workers_folder.iterdir():
            fd = _lock(path, wait=False)
            if fd is None:  # held: alive
                continue
            try:
                path.unlink(missing_ok=True)
            finally:
                os.close(fd)
            dead.append(path.name)
        return dead


#: What the sweep asks Prefect: a task run's state type, or None when Prefect has no such run.
Lookup = Callable[[str], Awaitable[str | None]]
#: Submits a delivery as a new task run with the given id.
Submit = Callable[[dict[str, Any], str], Awaitable[None]]
#: Ends an abandoned task run in Prefect: ``(task run id, "CRASHED" | "CANCELLED", message)``.
Mark = Callable[[str, str, str], Awaitable[None]]


class Sweeper:
    """Hands deliveries off through a `Journal`, and submits again those nothing can be running
    (see the module docs)."""

    def __init__(
        self,
        journal: Journal,
        lookup: Lookup,
        submit: Submit,
        mark: Mark,
        grace: float = 30.0,
        stale: float = 600.0,
        clock: Callable[[], float] = time.time,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        self.journal, self.lookup, self.submit, self.mark = journal, lookup, submit, mark
        self.grace, self.stale, self.clock, self.max_attempts = grace, stale, clock, max_attempts
        self.last_death = float("-inf")  # when a registered task worker was last found dead
        self._unclaimed: dict[tuple[str, str], float] = {}  # (delivery, run) Pending/Running unclaimed since

    async def record(self, delivery: dict[str, Any]) -> str:
        """The receiver's hand-off: the entry written durably, naming a new task run, then that run
        submitted, under the lock; the run's id. On a failed submission the entry is removed and the
        error raised (a receiver that dies between the two leaves an entry whose run Prefect does
        not have: the sweep submits it)."""
        entry = Entry(delivery, str(uuid4()), self.clock())
        async with self.journal.alocked(entry.id):
            await asyncio.to_thread(self.journal.write, entry)
            try:
                await self.submit(delivery, entry.task_run_id)
            except BaseException:
                self.journal.done(entry.id)
                raise
        return entry.task_run_id

    async def sweep(self) -> list[tuple[str, str]]:
        """One pass over the journal: ``(delivery id, what was done)`` for each delivery acted on."""
        dead = self.journal.dead_workers()
        if dead:
            self.last_death = self.clock()
            logger.warning("task worker(s) stopped: %s", ", ".join(dead))
        acted = []
        for delivery_id in self.journal.pending():
            with self.journal.locked(delivery_id, wait=False) as held:
                if held is None:  # a worker runs it, or the receiver is handing it off
                    continue
                entry = self.journal.read(delivery_id)
                if entry is None:  # done between the listing and the lock
                    self.journal.forget_lock(delivery_id)
                    continue
                verdict = await self._verdict(entry, held)
                if verdict is not None:
                    acted.append((delivery_id, await self._act(entry, *verdict)))
        pending = set(self.journal.pending())
        self._unclaimed = {k: v for k, v in self._unclaimed.items() if k[0] in pending}
        return acted

    async def _verdict(self, entry: Entry, held: Held) -> tuple[str, str] | None:
        """``(what to do, why)`` for an entry nobody holds: ``"again"`` (nothing can be running
        it), ``"requeue"`` (queued too long), ``"drop"`` (cancelled on purpose); None to leave it be."""
        run = entry.task_run_id
        if held.claim() == run:
            return "again", f"task run {run} was claimed by a worker that stopped before it finished"
        state = await self.lookup(run)
        if state is None:
            return "again", f"task run {run} is not in Prefect"
        if state == "CANCELLED":
            return "drop", f"task run {run} was cancelled in Prefect"
        if state in FINAL:
            return "again", f"task run {run} ended {state} without running it"
        if self.last_death > entry.submitted:
            return "again", f"a task worker stopped after task run {run} was submitted, and no worker claimed it"
        now = self.clock()
        if state == "SCHEDULED":
            waited = now - entry.submitted
            return ("requeue", f"task run {run} has been queued for {waited:.0f} s") if waited >= self.stale else None
        since = self._unclaimed.setdefault((entry.id, run), now)  # Pending or Running, no claim
        if now - since >= self.grace:
            return "again", f"task run {run} has been {state} for {now - since:.0f} s without a worker claiming it"
        return None

    async def _act(self, entry: Entry, action: str, reason: str) -> str:
        if action == "drop":  # stopped on purpose: kept for an operator, not run again
            self.journal.fail(entry.id, reason)
            logger.warning("delivery %s: %s; kept in %s", entry.id, reason, self.journal.failed_folder)
            return f"dropped: {reason}"
        if entry.attempts >= self.max_attempts:
            self.journal.fail(entry.id, f"submitted {entry.attempts} times; last: {reason}")
            logger.error("delivery %s: gave up after %d submissions (%s)", entry.id, entry.attempts, reason)
            return f"failed: {reason}"
        old = entry.task_run_id
        entry.task_run_id, entry.submitted, entry.attempts = str(uuid4()), self.clock(), entry.attempts + 1
        await asyncio.to_thread(self.journal.write, entry)  # first: a submitted run is always the entry's
        await self.submit(entry.delivery, entry.task_run_id)
        logger.warning("delivery %s submitted again as task run %s: %s", entry.id, entry.task_run_id, reason)
        message = f"delivery {entry.id} submitted again as task run {entry.task_run_id}: {reason}"
        try:
            await self.mark(old, "CANCELLED" if action == "requeue" else "CRASHED", message)
        except Exception as exc:  # only the UI's view of the old run: the delivery is safe
            logger.warning("could not mark task run %s: %s", old, exc)
        return f"submitted again: {reason}"
