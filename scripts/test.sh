#!/usr/bin/env bash
# The whole test suite: lint, type-check, then pytest (unit tests, and every endpoint and
# task against the real inference server, which the tests start with deployments/inference_server/up).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# The UI test drives Debian's chromium headless; a fresh machine does not have it.
if ! command -v chromium >/dev/null 2>&1; then
    echo "installing Debian's chromium for the UI test" >&2
    if [ "$(id -u)" = 0 ]; then sudo_cmd=(); else sudo_cmd=(sudo); fi
    "${sudo_cmd[@]}" apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq chromium >&2
fi
ruff check .
ruff format --check .
mypy blocks flows
exec pytest "$@"
