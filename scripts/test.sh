#!/usr/bin/env bash
# The whole test suite: lint, type-check, then pytest (unit tests, and every endpoint and
# task against the real inference server, which the tests start with deployments/inference_server/up).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
ruff check .
ruff format --check .
mypy blocks flows
exec pytest "$@"
