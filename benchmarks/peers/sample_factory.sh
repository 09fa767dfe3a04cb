#!/usr/bin/env bash
# Install Sample Factory 2.1.1 into its own virtual environment.
# Sample Factory 2.1.1 predates numpy 2 and gymnasium 1.0, so both are capped.
# Usage: bash benchmarks/peers/sample_factory.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-sample_factory"
bash "$here/make_venv.sh" sample_factory "sample-factory==2.1.1" "numpy<2" "gymnasium<1.0"
"$venv/bin/python" -c "import importlib.metadata as m, sample_factory, gymnasium, torch, numpy; print('sample-factory', m.version('sample-factory'), 'gymnasium', gymnasium.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__)"
