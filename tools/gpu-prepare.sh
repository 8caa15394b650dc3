#!/usr/bin/env bash
# tools/gpu-prepare.sh: fetch, on a machine with PyPI, what tools/gpu-check.sh needs on a GPU
# machine that has no network, into .gpu/ (git-ignored; carry it: `carry: [".gpu"]`):
#   .gpu/llama_cpp_python-0.3.36-slim.tar.gz  the llama-cpp-python sdist without what its build
#                                             never reads (llama.cpp's vocab models, docs, tests,
#                                             tools, examples, other backends): 73 MiB -> ~8 MiB
#   .gpu/wheels/*.whl                         pure or cp312 manylinux wheels of what the package
#                                             imports at test time (installed there only if missing)
# Usage: tools/gpu-prepare.sh            (PYTHON=... picks the interpreter that runs pip)
set -euo pipefail

LLAMA_VERSION=0.3.36
# what fgdilp_cpp, its tests and llama_cpp import; the versions tested here (make install)
WHEELS=(gguf==0.19.0 diskcache==5.6.3 click==8.5.1 jinja2==3.1.6 markupsafe==3.0.4 pyyaml==6.0.4
        tqdm==4.70.1 typing_extensions==4.16.0)
MAX_MIB=40   # the device tool carries 64 MiB in all, the working tree included

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
DEST=$ROOT/.gpu
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$DEST/wheels"

echo "== llama-cpp-python $LLAMA_VERSION sdist"
# --no-build-isolation: pip reads the sdist's metadata with the scikit-build-core installed here
# instead of building one (with --no-binary it would try to compile cmake and ninja from source)
"$PY" -m pip download -q --no-deps --no-build-isolation --no-binary=llama-cpp-python \
  "llama-cpp-python==$LLAMA_VERSION" -d "$TMP/sdist"
sdist=$(ls "$TMP"/sdist/llama_cpp_python-"$LLAMA_VERSION".tar.gz)
echo "   $(du -m "$sdist" | cut -f1) MiB, sha256 $(sha256sum "$sdist" | cut -d' ' -f1)"
tar -xzf "$sdist" -C "$TMP"
src=$TMP/llama_cpp_python-$LLAMA_VERSION
lc=$src/vendor/llama.cpp
# nothing below is read by a build with LLAVA_BUILD=OFF and llama.cpp's tests, tools, examples
# and server off (gpu-check.sh's CMAKE_ARGS); ggml adds a backend's folder only when it is on
rm -rf "$src/.git" "$src/.github" "$src/docs" "$src/examples" "$src/tests" "$src/docker" \
  "$lc/.git" "$lc/models" "$lc/docs" "$lc/media" "$lc/tests" "$lc/benches" "$lc/examples" "$lc/tools" \
  "$lc/gguf-py" "$lc/scripts" "$lc/conversion" "$lc/.devops" "$lc/.github" "$lc/ci" "$lc/grammars" \
  "$lc/prompts" "$lc/requirements" "$lc/pocs" "$lc/app"
for b in cann et hexagon metal musa opencl openvino rpc sycl virtgpu vulkan webgpu zdnn kompute; do
  rm -rf "$lc/ggml/src/ggml-$b"
done
test -f "$lc/ggml/src/ggml-cuda/CMakeLists.txt" || { echo "error: no ggml-cuda in the sdist" >&2; exit 1; }
test -f "$lc/CMakeLists.txt" || { echo "error: no llama.cpp CMakeLists.txt in the sdist" >&2; exit 1; }
slim=$DEST/llama_cpp_python-$LLAMA_VERSION-slim.tar.gz
tar -czf "$slim" -C "$TMP" "llama_cpp_python-$LLAMA_VERSION"
echo "   slimmed: $(du -m "$slim" | cut -f1) MiB -> $slim"

echo "== wheels for Python 3.12 on manylinux x86_64"
rm -f "$DEST"/wheels/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST/wheels" "${WHEELS[@]}"
ls -1 "$DEST/wheels"

total=$(du -sm "$DEST" | cut -f1)
echo "== .gpu/ holds $total MiB (limit $MAX_MIB MiB)"
if (( total > MAX_MIB )); then
  echo "error: .gpu/ is over $MAX_MIB MiB: the device tool would refuse the working tree" >&2
  exit 1
fi
