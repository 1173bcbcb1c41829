#!/usr/bin/env bash
# llama.cpp for tools/bench_gguf.sh, in the git-ignored venv .venv-llamacpp (or $LLAMACPP_VENV): its
# source is the copy vendored in PyPI's llama-cpp-python sdist; built with cmake/ninja from PyPI, only
# the library and the two benchmark tools (llama-bench, llama-batched-bench), native CPU flags, no
# server, tests or examples; the Python binding (for logits) is installed without a build of its own
# and loads that library (LLAMA_CPP_LIB_PATH). Takes 20-40 min on 2 cores. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LLAMACPP_VENV:-$PWD/.venv-llamacpp}
VERSION=0.3.36
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q cmake ninja scikit-build-core numpy diskcache jinja2 typing-extensions gguf==0.19.0 safetensors
SDIST=$VENV/sdist
mkdir -p "$SDIST" "$VENV/src"
[ -f "$SDIST/llama_cpp_python-$VERSION.tar.gz" ] ||
  "$VENV/bin/pip" download -q --no-deps --no-binary :all: --no-build-isolation "llama-cpp-python==$VERSION" -d "$SDIST"
[ -d "$VENV/src/llama_cpp_python-$VERSION" ] || tar xzf "$SDIST/llama_cpp_python-$VERSION.tar.gz" -C "$VENV/src"
"$VENV/bin/cmake" -S "$VENV/src/llama_cpp_python-$VERSION/vendor/llama.cpp" -B "$VENV/build" -G Ninja \
  -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON >/dev/null
"$VENV/bin/ninja" -C "$VENV/build" -j "$(nproc)" llama llama-bench llama-batched-bench
CMAKE_ARGS="-DLLAMA_BUILD=OFF" "$VENV/bin/pip" install -q --no-build-isolation \
  "$SDIST/llama_cpp_python-$VERSION.tar.gz"
echo "llama.cpp ready in $VENV/build/bin"
