"""serve.py's poll interval, and what each flow-run process pays to re-read serve.py.

Proves: serve polls for runs to start every 2 s unless ``PREFECT_RUNNER_POLL_FREQUENCY`` or
``--poll`` says otherwise (a triggered run waits for that poll); and executing serve.py's top level,
which every run's spawned process does (as ``__mp_main__``), imports neither the flows nor the
webhook module. The served runs themselves are in test_deployments_e2e.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import serve
from _e2e import DEPLOYMENTS, base_env


def test_serve_polls_every_two_seconds_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_RUNNER_POLL_FREQUENCY", raising=False)
    assert serve.parse_args([]).poll == serve.DEFAULT_POLL_SECONDS == 2.0
    monkeypatch.setenv("PREFECT_RUNNER_POLL_FREQUENCY", "7")  # Prefect's own setting is honoured
    assert serve.parse_args([]).poll == 7.0
    assert serve.parse_args(["--poll", "0.5"]).poll == 0.5


def test_a_run_process_reads_serve_py_without_importing_the_flows() -> None:
    code = (
        "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__mp_main__'); "
        "print(sorted(m for m in ('prefect', 'prefect_roboflow.flows', 'webhook') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(DEPLOYMENTS / "serve.py")],
        capture_output=True,
        text=True,
        check=False,
        env=base_env(),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
