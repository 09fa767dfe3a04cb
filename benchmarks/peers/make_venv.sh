#!/usr/bin/env bash
# Create benchmarks/peers/.venv-NAME and install torch (CPU build, pinned) then the given packages.
# Usage: bash benchmarks/peers/make_venv.sh NAME PIP_SPEC...
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-$1"
shift
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
"$venv/bin/pip" install -q "torch==2.13.0"
"$venv/bin/pip" install -q "$@"
