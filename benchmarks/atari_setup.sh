#!/usr/bin/env bash
# Sample Factory 2.1.1 for benchmarks/atari.py, in a --target folder of its own.
#
# Sample Factory 2.1.1 needs numpy<2 and gymnasium<1.0 (srl needs gymnasium>=1.0), so it is not
# installed beside srl: benchmarks/atari.py puts this folder first on the PYTHONPATH of the
# subprocess that runs it, and that subprocess takes torch from the interpreter (the GPU machine's
# CUDA build). ale-py 0.9 ships the ROMs in its wheel (no AutoROM download) and still supports
# gymnasium 0.29, which registers the NoFrameskip-v4 games sf_examples/atari uses.
#
# Here (network):     bash benchmarks/peers/sample_factory_atari.sh download   # wheels into .whl/sf-atari
# GPU machine (none): bash benchmarks/peers/sample_factory_atari.sh install    # from those wheels
# One step (network): bash benchmarks/peers/sample_factory_atari.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
target="${SF_TARGET:-$root/benchmarks/peers/.sf-atari}"
wheels="$root/.whl/sf-atari"
python="${PYTHON:-python3}"
# torch is left out on purpose (the interpreter's own is used); wandb is imported only with --with_wandb.
pkgs=("sample-factory==2.1.1" "numpy<2" "gymnasium[atari]==0.29.1" "ale-py==0.9.1" "pyglet" "tensorboardx>=2.0"
      "psutil>=5.7" "threadpoolctl>=2.0" "colorlog" "signal-slot-mp>=1.0.3,<2.0" "faster-fifo>=1.4.2,<2.0" "filelock"
      "opencv-python-headless" "huggingface-hub>=0.10,<1.0" "tensorboard>=1.15" "farama-notifications" "cloudpickle")
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64)
case "${1:-all}" in
  download)
    mkdir -p "$wheels"
    "$python" -m pip download -q -d "$wheels" "${platform[@]}" --no-deps "${pkgs[@]}"
    echo "wheels in $wheels (carry the folder; the deps of these packages that the GPU image lacks must be added)";;
  install)
    "$python" -m pip install -q --no-index --find-links "$wheels" --no-deps --target "$target" "${pkgs[@]}";;
  all)
    "$python" -m pip install -q --no-deps --target "$target" "${pkgs[@]}";;
  *) echo "usage: $0 [download|install|all]" >&2; exit 2;;
esac
[ "${1:-all}" = download ] || PYTHONPATH="$target" "$python" -c \
  "import importlib.metadata as m, sample_factory, gymnasium, numpy; print('sample-factory', m.version('sample-factory'), 'gymnasium', gymnasium.__version__, 'numpy', numpy.__version__)"
