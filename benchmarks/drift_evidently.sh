#!/usr/bin/env bash
# Make (or reuse) the side virtualenv of Evidently 0.7.23, the oracle the drift power benchmark
# (benchmarks/drift_power.py) runs beside monitor_drift's methods. Evidently needs scikit-learn,
# scipy, statsmodels, plotly<6, litestar, nltk, uvicorn and more: it is never a dependency of the
# project, only a program the benchmark calls. The last line of stdout is the venv's python.
#
#   benchmarks/drift_evidently.sh        # ~2 min and 1.1 GB the first time, instant after
#
# Environment:
#   PREFECT_ROBOFLOW_CACHE  cache root (default ~/.cache/prefect-roboflow)
#   EVIDENTLY_PYTHON        interpreter used to create the venv (default python3)
set -euo pipefail
{
EVIDENTLY_VERSION=0.7.23
ROOT="${PREFECT_ROBOFLOW_CACHE:-$HOME/.cache/prefect-roboflow}/evidently-${EVIDENTLY_VERSION}"
VENV="$ROOT/venv"
MARKER="$VENV/.prefect-roboflow-install-complete"
mkdir -p "$ROOT"
exec 9>"$ROOT/up.lock"
flock 9  # one install at a time
if [ ! -f "$MARKER" ]; then
    rm -rf "$VENV"
    echo "drift_evidently: installing evidently==${EVIDENTLY_VERSION} into $VENV" >&2
    "${EVIDENTLY_PYTHON:-python3}" -m venv "$VENV"
    # pandas 3 removed pandas.core.dtypes.common.infer_dtype_from_object, which evidently 0.7.23 imports.
    "$VENV/bin/pip" install --disable-pip-version-check "evidently==${EVIDENTLY_VERSION}" "pandas<3" \
        >"$ROOT/install.log" 2>&1 || { tail -20 "$ROOT/install.log" >&2; exit 1; }
    "$VENV/bin/python" -c "import evidently; assert evidently.__version__ == '${EVIDENTLY_VERSION}', evidently.__version__" >&2
    touch "$MARKER"
fi
echo "$VENV/bin/python"
exit 0
}
