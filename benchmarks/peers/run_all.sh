#!/usr/bin/env bash
# Install any missing peer environment, then run every peer (and srl) for seeds 1..3.
# Usage: bash benchmarks/peers/run_all.sh [--out PATH] [other compare.py options]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/../.."
args=("$@")
if [[ " ${args[*]-} " != *" --out "* ]]; then
    args+=(--out "$here/results/peers.json")
fi
exec python3 "$here/compare.py" --install "${args[@]}"
