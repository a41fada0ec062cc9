"""What every benchmark shares: generated images, the latency proxy process, runs and tables."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

from support.fault_proxy import FaultProxy  # noqa: E402
from support.images import make_image, make_scene  # noqa: E402

__all__ = [
    "FaultProxy",
    "LatencyProxy",
    "Run",
    "Table",
    "descendants",
    "generate_images",
    "generate_scenes",
    "process_cpu",
    "ratio",
    "verdict",
]

#: 50 ms before each forwarded request: a server across a network (benchmark_notes.md).
NETWORK_LATENCY = 0.05


def process_cpu(pid: int) -> float:
    """CPU seconds process ``pid`` has used so far, all its threads (from /proc; NaN when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def descendants(root: int) -> set[int]:
    """The PIDs of ``root``'s children, their children, and so on (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found: set[int] = set()
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in found]
        found.update(children)
        frontier.extend(children)
    return found


def generate_images(folder: Path, count: int, size: tuple[int, int] = (320, 240), first_seed: int = 0) -> list[Path]:
    """``count`` distinct, deterministic PNGs in ``folder`` (reused when already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(first_seed, first_seed + count):
        path = folder / f"img-{seed:06d}.png"
        if not path.exists():
            path.write_bytes(make_image(seed, size=size))
        paths.append(path)
    return paths


def generate_scenes(folder: Path, count: int) -> list[Path]:
    """``count`` 320×240 scenes with 80×80 objects, the size the placeholder OWLv2 can match."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        path = folder / f"scene-{seed:04d}.png"
        if not path.exists():
            path.write_bytes(make_scene(seed))
        paths.append(path)
    return paths


@dataclass
class Run:
    """One timed run of one client over some images."""

    client: str
    setting: str
    images: int
    seconds: float
    requests: int | None = None
    server_seconds: float | None = None
    concurrency: int | None = None

    @property
    def rate(self) -> float:
        """Images per second."""
        return self.images / self.seconds if self.seconds > 0 else float("nan")


class ProxyProcess:
    """A benchmark proxy in its own process (its event loop never competes for the GIL of the
    client being measured), driven by one-line commands on its stdin; ``url`` once started."""

    module = ""
    name = "proxy"

    def __init__(self, *args: str) -> None:
        self.args = list(args)
        self._process: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self: P) -> P:
        self._process = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.url = self._ask("url")
        return self

    def _ask(self, command: str) -> str:
        assert self._process is not None and self._process.stdin and self._process.stdout
        self._process.stdin.write(command + "\n")
        self._process.stdin.flush()
        answer = self._process.stdout.readline().strip()
        if not answer:
            raise RuntimeError(f"{self.name} exited (code {self._process.poll()})")
        return answer

    @property
    def pid(self) -> int:
        """The proxy process's PID."""
        assert self._process is not None, "use the proxy as a context manager"
        return self._process.pid

    def clear(self) -> None:
        """Restart the proxy's counts."""
        self._ask("clear")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._process is not None:
            assert self._process.stdin is not None
            self._process.stdin.close()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


P = TypeVar("P", bound=ProxyProcess)


class LatencyProxy(ProxyProcess):
    """`tests/support/fault_proxy.FaultProxy` waiting ``latency`` seconds before each request,
    counting the requests it forwards."""

    module, name = "benchmarks.proxy_process", "latency proxy"

    def __init__(self, upstream: str, latency: float) -> None:
        super().__init__(upstream, str(latency))
        self.upstream, self.latency = upstream, latency

    def count(self) -> int:
        """Requests forwarded since the last `clear`."""
        return int(self._ask("count"))


class Table:
    """A table of figures, printed as aligned text and written as markdown."""

    def __init__(self, title: str, columns: Sequence[str], note: str = "") -> None:
        self.title = title
        self.columns = list(columns)
        self.note = note
        self.rows: list[list[str]] = []

    def add(self, *cells: Any) -> None:
        """Append a row; floats are rounded for reading."""
        self.rows.append([_cell(c) for c in cells])

    def text(self) -> str:
        """The table as aligned plain text."""
        widths = [
            max(len(c), *(len(r[i]) for r in self.rows)) if self.rows else len(c) for i, c in enumerate(self.columns)
        ]
        lines = [f"\n== {self.title} =="]
        lines.append("  ".join(c.ljust(w) for c, w in zip(self.columns, widths, strict=True)))
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in self.rows]
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def markdown(self) -> str:
        """The table as a markdown section."""
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value != value:  # NaN
            return "—"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is zero."""
    return a / b if b else float("nan")


def verdict(ok: bool) -> str:
    """PASS or FAIL."""
    return "PASS" if ok else "FAIL"
