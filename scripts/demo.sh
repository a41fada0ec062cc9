#!/usr/bin/env bash
# The main job, end to end: start the local inference server, then run the demo through it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
url="$(deployments/inference_server/up | tail -n 1)"
INFERENCE_SERVER_URL="$url" exec python -m prefect_roboflow.flows.demo "$@"
