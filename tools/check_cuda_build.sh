#!/usr/bin/env bash
# Type-checks the three workers with `--features cuda` on a machine without a CUDA toolkit or GPU:
# candle's cuda feature runs nvcc at build time (cudarc's build script, candle-kernels' .cu files),
# and PyPI's CUDA 13 wheels carry nvcc. Takes 13-17 minutes on 2 cores (candle-kernels dominates).
# Nothing is linked, so no CUDA libraries or driver are needed.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-cuda
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-cccl nvidia-cuda-crt nvidia-cuda-nvrtc
fi
cuda=$("$venv/bin/python" -c 'import nvidia, pathlib; print(pathlib.Path(nvidia.__path__[0]) / "cu13")')
export PATH="$cuda/bin:$PATH" CUDA_ROOT="$cuda" CUDA_PATH="$cuda" CUDA_HOME="$cuda"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# Its own target directory: the cuda feature changes candle's build, which would otherwise
# invalidate the CPU build's artefacts.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda-check}"
nvcc --version | tail -1

features=llm-worker/cuda,sam-worker/cuda,vision-worker/cuda
cargo clippy -p llm-worker -p sam-worker -p vision-worker --all-targets --features "$features" -- -D warnings
echo "cuda build of the workers type-checks (clippy -D warnings)"
