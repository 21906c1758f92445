#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels tools/gpu_check.sh installs on a GPU machine that has no
# registry: what `pip install -e .` and the checks need beyond that machine's image (REFERENCE §7:
# Python 3.12, torch 2.11 + CUDA 13, triton 3.6, numpy, opencv, tqdm, pyyaml, scikit-learn,
# matplotlib, pillow, pytest, pybind11, ninja, requests, portalocker, sympy present):
#   spconv-triton, omegaconf + antlr4-python3-runtime   the GPU backend and the config loader;
#   spconv + cumm (CPU builds, cp312, ~4 MB) + pccm, ccimport, fire, termcolor, lark
#                                                       the CPU reference of the parity check.
#
#   bash tools/make_gpu_wheels.sh          # then carry ".whl" in the device call (~5 MB)
#
# The versions installed here, so the GPU run uses what the CPU tests used. pip download fetches
# the published wheel; a pure-Python package published as a source archive only is built into a
# wheel here (pip wheel), since the GPU machine cannot build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEST=${DEST:-.whl}
mkdir -p "$DEST"
version() {  # the version installed here, else the fallback
  $PY -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: print(sys.argv[2])" "$1" "$2"
}
LINUX=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
       --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
fetch() {  # name fallback-version pure|binary
  local v
  v=$(version "$1" "$2")
  rm -f "$DEST/$(echo "$1" | tr - _)"-*.whl  # one version of each: two stop the whole install
  if [ "$3" = binary ]; then
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${LINUX[@]}" -d "$DEST" "$1==$v"
  elif ! $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
        --platform any -d "$DEST" "$1==$v" 2>/dev/null; then
    $PY -m pip wheel -q --no-deps -w "$DEST" "$1==$v"
  fi
}
fetch spconv-triton 1.0.0 pure
fetch omegaconf 2.3.0 pure
fetch antlr4-python3-runtime 4.9.3 pure
fetch spconv 2.3.8 binary
fetch cumm 0.7.11 binary
for p in "pccm 0.4.16" "ccimport 0.4.4" "fire 0.7.1" "termcolor 3.3.0" "lark 1.3.1"; do
  fetch $p pure
done
ls -l "$DEST"
du -sh "$DEST"
