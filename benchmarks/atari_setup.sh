#!/usr/bin/env bash
# Packages for benchmarks/atari.py on the GPU machine, which reaches no package index: prepared here
# (python 3.12, manylinux x86-64: the GPU image's interpreter) and carried in .whl/atari (14 MB).
#
#   bash benchmarks/atari_setup.sh download   # here, with network: .whl/atari/
#   bash benchmarks/atari_setup.sh install    # there: srl's missing deps into $SITE, Sample Factory into $SF_TARGET
#
# srl needs gymnasium>=1.0, ale-py>=0.10 (ROMs inside the wheel) and pyzmq beside what the GPU image
# has (torch, numpy, msgpack, pyyaml, safetensors, tensorboard, opencv).
# Sample Factory 2.1.1 needs numpy<2 (its sampler fails on numpy 2) and gymnasium<1.0, so it is
# installed for cp312 here into a folder of its own, stripped of VizDoom's maps and numpy's tests,
# and carried as one .tar.xz (11 MB, against 30 MB of wheels); benchmarks/atari.py puts that folder
# first on the PYTHONPATH of the subprocess running Sample Factory, which takes torch, opencv,
# psutil and the rest from the interpreter. ale-py 0.9.1 is the last ale-py for gymnasium 0.29 and
# ships its ROMs; gymnasium 0.29 registers the NoFrameskip-v4 games that sf_examples/atari uses.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
dest="$root/.whl/atari"
site="${SITE:-/tmp/atari-site}"
target="${SF_TARGET:-/tmp/sf-atari}"
srl_pkgs=("gymnasium>=1.0" "ale-py>=0.10" "pyzmq" "farama-notifications" "cloudpickle")
sf_pkgs=("sample-factory==2.1.1" "numpy<2" "gymnasium==0.29.1" "ale-py==0.9.1" "signal-slot-mp>=1.0.3,<2.0"
         "faster-fifo>=1.4.2,<2.0" "tensorboardx>=2.0" "colorlog" "farama-notifications" "cloudpickle")
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)
case "${1:-}" in
  download)
    grep -qx "/.whl/" "$root/.gitignore" || echo "/.whl/ must stay ignored" >&2
    tmp="$(mktemp -d)"
    "$python" -m pip download -q -d "$dest" "${platform[@]}" --no-deps "${srl_pkgs[@]}"
    "$python" -m pip install -q --target "$tmp/sf" "${platform[@]}" --no-deps "${sf_pkgs[@]}"
    rm -rf "$tmp/sf/sf_examples/vizdoom/doom/scenarios" "$tmp"/sf/numpy/*/tests "$tmp/sf/numpy/tests" "$tmp/sf/bin"
    tar -C "$tmp/sf" -cJf "$dest/sf-atari-py312.tar.xz" .
    rm -rf "$tmp"
    du -sh "$dest";;
  install)
    "$python" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$dest"/*.whl
    mkdir -p "$target" && tar -C "$target" -xJf "$dest/sf-atari-py312.tar.xz"
    PYTHONPATH="$target" "$python" -c "import importlib.metadata as m, sample_factory, gymnasium, numpy, torch; \
print('sample-factory', m.version('sample-factory'), 'gymnasium', gymnasium.__version__, 'numpy', numpy.__version__, \
'torch', torch.__version__)"
    PYTHONPATH="$root:$site" "$python" -c "import ale_py, gymnasium, zmq, srl; \
print('srl ok: ale-py', ale_py.__version__, 'gymnasium', gymnasium.__version__)"
    echo "export PYTHONPATH=$root:$site   # then: python benchmarks/atari.py --device cuda --sf-target $target";;
  *) echo "usage: $0 download|install" >&2; exit 2;;
esac
