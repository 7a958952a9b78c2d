#!/usr/bin/env bash
# Set up edge-mla in ./.venv from nothing, with the tested dependency set (constraints.txt).
#   ./install.sh              the package (convert, export, budget, run ONNX)
#   ./install.sh llama,test   plus extras: llama = llama-cpp-python (compiles llama.cpp, ~10 min on 2 cores)
#                             phones = onnxruntime-genai (docs/phones.md)
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-}"
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# torch first and pinned: the CPU wheel; an unpinned torch pulls GBs of CUDA packages
pip install -q -c constraints.txt torch==2.13.0
if [[ ",$extras," == *",llama,"* && -z "${CMAKE_ARGS:-}" && "$(uname -m)" == "x86_64" ]]; then
  # llama.cpp's default -march=native build dies with SIGILL when the wheel (cached by pip) meets another CPU,
  # and on VMs that advertise AMX. Build for x86-64-v3 (AVX2, FMA, F16C), which every current x86 host runs.
  # Set CMAKE_ARGS yourself to build for your own CPU instead.
  export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
fi
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
pip install -q -c constraints.txt -e ".${extras:+[$extras]}"
echo "edge-mla installed in $(pwd)/.venv: . .venv/bin/activate"
