#!/usr/bin/env bash
# Create .venv and install dllm into it. The CPU build of torch goes first: an unpinned torch
# would pull several GB of CUDA packages. On a GPU machine, install the CUDA torch you want first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -d .venv ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,gguf,plot,api]"
