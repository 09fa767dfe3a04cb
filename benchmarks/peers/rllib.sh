#!/usr/bin/env bash
# Install RLlib (ray[rllib] 2.60.0) into its own virtual environment.
# Usage: bash benchmarks/peers/rllib.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-rllib"
bash "$here/make_venv.sh" rllib "ray[rllib]==2.60.0"
"$venv/bin/python" -c "import ray, gymnasium, torch, numpy; print('ray', ray.__version__, 'gymnasium', gymnasium.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__)"
