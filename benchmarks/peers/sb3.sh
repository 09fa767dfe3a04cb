#!/usr/bin/env bash
# Install Stable-Baselines3 2.9.2 into its own virtual environment.
# Usage: bash benchmarks/peers/sb3.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-sb3"
bash "$here/make_venv.sh" sb3 "stable-baselines3==2.9.2"
"$venv/bin/python" -c "import stable_baselines3, gymnasium, torch; print('sb3', stable_baselines3.__version__, 'gymnasium', gymnasium.__version__, 'torch', torch.__version__)"
