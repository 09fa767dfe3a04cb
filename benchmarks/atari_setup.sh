#!/usr/bin/env bash
# Packages for benchmarks/atari.py on the GPU machine, which reaches no package index: wheels are
# downloaded here (python 3.12, manylinux x86-64: the GPU image's interpreter) and carried in .whl/.
#
#   bash benchmarks/atari_setup.sh download   # here, with network: .whl/srl and .whl/sf-atari (~35 MB)
#   bash benchmarks/atari_setup.sh install    # there: srl's missing deps, srl itself, Sample Factory
#
# srl needs gymnasium>=1.0, ale-py>=0.10 (ROMs inside the wheel) and pyzmq beside what the GPU image
# has (torch, numpy, msgpack, pyyaml, safetensors, tensorboard, opencv).
# Sample Factory 2.1.1 needs numpy<2 and gymnasium<1.0, so it goes into a --target folder of its own
# (benchmarks/peers/.sf-atari) that benchmarks/atari.py puts first on the PYTHONPATH of the
# subprocess running it; that subprocess takes torch, opencv, psutil and the rest from the
# interpreter. ale-py 0.9.1 is the last ale-py for gymnasium 0.29 and ships its ROMs (no AutoROM),
# and gymnasium 0.29 registers the NoFrameskip-v4 games that sf_examples/atari uses.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
target="${SF_TARGET:-$root/benchmarks/peers/.sf-atari}"
srl_pkgs=("gymnasium>=1.0" "ale-py>=0.10" "pyzmq" "farama-notifications")
sf_pkgs=("sample-factory==2.1.1" "numpy<2" "gymnasium==0.29.1" "ale-py==0.9.1" "signal-slot-mp>=1.0.3,<2.0"
         "faster-fifo>=1.4.2,<2.0" "tensorboardx>=2.0" "colorlog" "pyglet" "farama-notifications")
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)
case "${1:-}" in
  download)
    grep -qx "/.whl/" "$root/.gitignore" || echo "/.whl/ must stay ignored" >&2
    "$python" -m pip download -q -d "$root/.whl/srl" "${platform[@]}" --no-deps "${srl_pkgs[@]}"
    "$python" -m pip download -q -d "$root/.whl/sf-atari" "${platform[@]}" --no-deps "${sf_pkgs[@]}"
    du -sh "$root/.whl/srl" "$root/.whl/sf-atari";;
  install)
    "$python" -m pip install -q --no-index --find-links "$root/.whl/srl" --no-deps "${srl_pkgs[@]}"
    "$python" -m pip install -q --no-deps -e "$root"
    "$python" -m pip install -q --no-index --find-links "$root/.whl/sf-atari" --no-deps --target "$target" "${sf_pkgs[@]}"
    PYTHONPATH="$target" "$python" -c "import importlib.metadata as m, sample_factory, gymnasium, numpy, torch; \
print('sample-factory', m.version('sample-factory'), 'gymnasium', gymnasium.__version__, 'numpy', numpy.__version__, \
'torch', torch.__version__)"
    "$python" -c "import ale_py, gymnasium, zmq, srl; print('srl ok: ale-py', ale_py.__version__, 'gymnasium', gymnasium.__version__)";;
  *) echo "usage: $0 download|install" >&2; exit 2;;
esac
