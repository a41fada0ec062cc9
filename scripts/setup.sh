#!/usr/bin/env bash
# Create or refresh the project's virtualenv (.venv) with the package and its dev tools.
# Sourced by demo.sh and test.sh; safe to run again (it reinstalls only when pyproject changes).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PREFECT_ROBOFLOW_VENV:-$repo/.venv}"
if [ ! -x "$venv/bin/python" ]; then
    echo "creating $venv" >&2
    python3 -m venv "$venv"
fi
stamp="$venv/.prefect-roboflow-$(sha256sum "$repo/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "installing prefect-roboflow and its dev tools into $venv (a few minutes the first time)" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check -e "$repo[dev]" >&2
    rm -f "$venv"/.prefect-roboflow-*
    touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
