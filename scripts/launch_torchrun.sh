#!/usr/bin/env bash
# Multi-node training with torchrun's c10d rendezvous: run the same command on every node; node ranks
# are assigned at rendezvous. Settings by environment (defaults in brackets):
#   MASTER_ADDR (required): an address of one node that all nodes reach   MASTER_PORT [29500]
#   NNODES [2]   NPROC_PER_NODE [8: the GPUs per node]   RDZV_ID [instructune]   PYTHON [.venv/bin/python]
#   MAX_RESTARTS [0]: restarts of every worker after one fails (a restarted run resumes from its newest checkpoint)
#   TRAIN_SCRIPT [train.py]
# Example, 2 nodes x 8 GPUs, Alpaca's 7B recipe with ZeRO-3 (on each node):
#   MASTER_ADDR=node-1 NNODES=2 NPROC_PER_NODE=8 scripts/launch_torchrun.sh \
#       --config configs/llama2-7b-alpaca.yaml --strategy zero3 --gradient_accumulation_steps 2
#
# Preemption: TERM, INT or USR1 sent to this script makes every worker finish its step, save a complete checkpoint
# and stop; the script then exits 75, and the same command resumes the run. torchrun forwards TERM and INT to its
# workers (and kills them 30 s later) but would die of USR1, so it runs with USR1 ignored and this script hands USR1
# to the workers itself: with USR1 a save may take as long as it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MASTER_ADDR:?set MASTER_ADDR to the address of one of the nodes}"
# Each restart's workers get a store of their own: torchrun's shared rendezvous store keeps the previous attempt's
# process-group keys, and a restarted gloo group then connects to the dead workers' addresses (torch 2.13: one
# restart in three failed). Can go when torchrun prefixes those keys per attempt.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
export INSTRUCTUNE_PREEMPTED_FILE
INSTRUCTUNE_PREEMPTED_FILE="$(mktemp -u "${TMPDIR:-/tmp}/instructune-preempted.XXXXXX")"
(
    trap '' USR1
    exec "${PYTHON:-.venv/bin/python}" -m torch.distributed.run \
        --nnodes "${NNODES:-2}" --nproc_per_node "${NPROC_PER_NODE:-8}" \
        --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id "${RDZV_ID:-instructune}" \
        --max-restarts "${MAX_RESTARTS:-0}" "${TRAIN_SCRIPT:-train.py}" "$@"
) &
torchrun=$!
trap 'pkill -USR1 -P "$torchrun" || true' USR1
trap 'kill -TERM "$torchrun" 2>/dev/null || true' TERM
trap 'kill -INT "$torchrun" 2>/dev/null || true' INT
status=0
while :; do  # a trapped signal interrupts `wait`: wait again until torchrun has ended
    wait "$torchrun" && status=0 || status=$?
    kill -0 "$torchrun" 2>/dev/null || break
done
if [ -e "$INSTRUCTUNE_PREEMPTED_FILE" ]; then
    echo "instructune: preempted: $(cat "$INSTRUCTUNE_PREEMPTED_FILE"); rerun the same command to resume" >&2
    rm -f "$INSTRUCTUNE_PREEMPTED_FILE"
    exit 75
fi
exit "$status"
