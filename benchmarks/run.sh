#!/usr/bin/env bash
# The performance benchmarks (issue 5), end to end, from a fresh clone:
#
#   bash benchmarks/run.sh [--n 500] [--sweep-n 200] [--memory-sizes 1000,10000] [--photos 32] [--only throughput,memory,big_photos,...]
#   bash benchmarks/run.sh --only index [--sizes 100000,1000000]   # the vector index (no server needed)
#   bash benchmarks/run.sh --only curation [--rows 1000000]         # curate_images (no server needed)
#
# 1. the project venv (.venv) through scripts/setup.sh;
# 2. the local inference server through deployments/inference_server/up (started, or reused);
# 3. an interpreter with inference-sdk for the SDK baseline: the server's own venv when it can
#    import inference_sdk (inference-cpu depends on it), else a benchmark-only venv
#    (~/.cache/prefect-roboflow/bench-venv) — its pins (numpy<2.4, requests, opencv) clash
#    with the project's, so it never goes into .venv;
# 4. python -m benchmarks.bench: prints every table and writes benchmarks/RESULTS.md.
#
# Prefect's own log lines go to out/benchmarks/run.log; the tables go to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

if [ "${1:-}" = "--only" ] && [ "${2:-}" = "index" ]; then
    exec python -m benchmarks.index_bench "${@:3}"
fi
if [ "${1:-}" = "--only" ] && [ "${2:-}" = "curation" ]; then
    exec python -m benchmarks.curation bench "${@:3}"
fi

url="$(deployments/inference_server/up | tail -n 1)"

SDK_VERSION=1.8.3
cache_root="${PREFECT_ROBOFLOW_CACHE:-$HOME/.cache/prefect-roboflow}"
sdk_python="${BENCH_SDK_PYTHON:-$cache_root/inference-cpu-$SDK_VERSION/venv/bin/python}"
if ! "$sdk_python" -c "import inference_sdk" 2>/dev/null; then
    bench_venv="$cache_root/bench-venv"
    sdk_python="$bench_venv/bin/python"
    if ! "$sdk_python" -c "import inference_sdk" 2>/dev/null; then
        echo "installing inference-sdk==$SDK_VERSION into $bench_venv" >&2
        python3 -m venv "$bench_venv"
        "$bench_venv/bin/pip" install --quiet --disable-pip-version-check "inference-sdk==$SDK_VERSION" >&2
    fi
fi

mkdir -p out/benchmarks
echo "server: $url   sdk interpreter: $sdk_python   Prefect logs: out/benchmarks/run.log" >&2
# A throwaway Prefect home and API (started by bench.py) keep the user's own Prefect untouched.
bench_home="$(mktemp -d)"
trap 'rm -rf "$bench_home"' EXIT
status=0
PREFECT_HOME="$bench_home" PREFECT_SERVER_ANALYTICS_ENABLED=false \
    python -m benchmarks.bench --server "$url" --sdk-python "$sdk_python" \
    --results benchmarks/RESULTS.md --command "bash benchmarks/run.sh $*" "$@" \
    2>out/benchmarks/run.log || status=$?
# 3: a target does not hold (the report says which); anything else: the benchmark itself broke.
if [ "$status" -ne 0 ] && [ "$status" -ne 3 ]; then
    tail -n 40 out/benchmarks/run.log >&2
fi
exit "$status"
