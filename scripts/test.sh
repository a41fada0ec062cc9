#!/usr/bin/env bash
# The whole test suite, on the package as users install it: build an sdist and a wheel from this
# tree, install the wheel (not editable) into a fresh virtualenv, then lint the source, type-check
# the installed package and run pytest from a folder where the source tree cannot be imported.
#
#   bash scripts/test.sh                          # everything (CI runs exactly this)
#   bash scripts/test.sh tests/unit -k contract   # pytest arguments; paths relative to the repo
#
# The fresh virtualenv is .venv-installed/ (made anew on every run; kept afterwards to look into).
# The real inference server is started by the tests (deployments/inference_server/up).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

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

venv="$repo/.venv-installed"
rm -rf "$venv"
echo "making a fresh virtualenv in $venv" >&2
python3 -m venv "$venv"
pip=("$venv/bin/pip" --disable-pip-version-check --quiet)
"${pip[@]}" install build twine >&2

dist="$(mktemp -d)"
work="$(mktemp -d)"
trap 'rm -rf "$dist" "$work"' EXIT
echo "building the sdist and, from it, the wheel" >&2
"$venv/bin/python" -m build --outdir "$dist" "$repo" >"$dist/build.log" 2>&1 || { cat "$dist/build.log" >&2; exit 1; }
rm -rf "$repo/build" "$repo"/*.egg-info
"$venv/bin/twine" check --strict "$dist"/*.whl "$dist"/*.tar.gz
wheel="$(ls "$dist"/*.whl)"
echo "installing $(basename "$wheel") with its dev tools (not editable)" >&2
"${pip[@]}" install "$wheel[dev]" >&2
export PATH="$venv/bin:$PATH"

ruff check "$repo"
ruff format --check "$repo"
(cd "$work" && mypy --config-file "$repo/pyproject.toml" -p prefect_roboflow)

# pytest from an empty folder: only the installed prefect_roboflow can be imported. Arguments that
# name repo paths (tests/unit, tests/x.py::test_y) are made absolute; with none, the whole suite.
args=()
paths=0
for arg in "$@"; do
    if [[ "$arg" != -* && -e "$repo/${arg%%::*}" ]]; then
        args+=("$repo/$arg")
        paths=1
    else
        args+=("$arg")
    fi
done
[ "$paths" = 1 ] || args+=("$repo/tests")
cd "$work"
status=0
python -m pytest -c "$repo/pyproject.toml" --rootdir "$repo" "${args[@]}" || status=$?
exit "$status"
