#!/usr/bin/env bash
# The whole test suite: lint, type-check, then pytest (unit tests, and every endpoint and
# task against the real inference server, which the tests start with deployments/inference_server/up).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# Debian packages a fresh machine lacks: chromium (the UI and gallery tests drive it headless) and
# postgresql (the tests start a throw-away cluster of their own; nothing else uses it).
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing Debian's ${missing[*]} for the tests" >&2
    if [ "$(id -u)" = 0 ]; then sudo_cmd=(); else sudo_cmd=(sudo); fi
    "${sudo_cmd[@]}" apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >&2
fi
ruff check .
ruff format --check .
mypy blocks flows
exec pytest "$@"
