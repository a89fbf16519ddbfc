#!/usr/bin/env bash
# Multi-node training with torchrun's c10d rendezvous: run the same command on every node; node ranks
# are assigned at rendezvous. Settings by environment (defaults in brackets):
#   MASTER_ADDR (required): an address of one node that all nodes reach   MASTER_PORT [29500]
#   NNODES [2]   NPROC_PER_NODE [8: the GPUs per node]   RDZV_ID [instructune]   PYTHON [.venv/bin/python]
# Example, 2 nodes x 8 GPUs, Alpaca's 7B recipe with ZeRO-3 (on each node):
#   MASTER_ADDR=node-1 NNODES=2 NPROC_PER_NODE=8 scripts/launch_torchrun.sh \
#       --config configs/llama2-7b-alpaca.yaml --strategy zero3 --gradient_accumulation_steps 2
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MASTER_ADDR:?set MASTER_ADDR to the address of one of the nodes}"
exec "${PYTHON:-.venv/bin/python}" -m torch.distributed.run \
    --nnodes "${NNODES:-2}" --nproc_per_node "${NPROC_PER_NODE:-8}" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id "${RDZV_ID:-instructune}" \
    train.py "$@"
