#!/usr/bin/env bash
# The main job, end to end: start a local inference server and a local Prefect server (both on
# 127.0.0.1, both reused when already running), then run detect_crop_classify on the bundled images.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
url="$(deployments/inference_server/up | tail -n 1)"

state="${PREFECT_ROBOFLOW_CACHE:-$HOME/.cache/prefect-roboflow}"
mkdir -p "$state"
prefect_port="${PREFECT_PORT:-4200}"
export PREFECT_API_URL="http://127.0.0.1:$prefect_port/api"
healthy() { python -c "import sys, httpx; sys.exit(httpx.get('$PREFECT_API_URL/health', timeout=2).status_code != 200)" 2>/dev/null; }
if ! healthy; then
    echo "starting a Prefect server on 127.0.0.1:$prefect_port (log: $state/prefect-server.log)" >&2
    nohup prefect server start --host 127.0.0.1 --port "$prefect_port" >"$state/prefect-server.log" 2>&1 &
    echo $! >"$state/prefect-server.pid"
    for _ in $(seq 120); do healthy && break; sleep 1; done
    healthy || { tail -n 30 "$state/prefect-server.log" >&2; exit 1; }
fi

INFERENCE_SERVER_URL="$url" python -m prefect_roboflow.flows.demo "$@"
echo "stop the servers with: deployments/inference_server/down; kill \$(cat $state/prefect-server.pid)" >&2
