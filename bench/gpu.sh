#!/usr/bin/env bash
# Every GPU measurement the project needs, in one run of under 8 minutes on one H100/H200, written to
# bench/results/gpu-<date>.md: the figures of each step (its benchmark's machine-readable last line) in a
# table, then each step's command, time and output.
#   1. a random ~1.1B LLaMA (TinyLlama's shape, SmolLM2's tokenizer) built locally: nothing is downloaded;
#   2. throughput (bench/throughput.py, bf16): Alpaca's pipeline against ours on SmolLM2-135M with sdpa, then on
#      the ~1B model with flash-attention (where flash_attn is installed), flex attention and torch.compile
#      (padding-free and packed batches against the reference);
#   3. the planner's predicted peak GPU memory against the measured one for the ~1B model (bench/plan.py --gpu);
#   4. full fine-tuning, LoRA and QLoRA of the ~1B model: step time and peak memory (bench/adapters.py);
#   5. the server's requests/s, tokens/s and time to first token at 1, 8 and 32 clients (bench/serve.py).
# Each step has a time limit; a step that fails or runs out of time is recorded as such and the others still run
# (the exit status is then 1). The steps run one at a time, each with the machine to itself.
#
#   bash bench/gpu.sh                 # on a GPU machine set up by scripts/setup.sh with a CUDA torch (TORCH_SPEC)
#   bash bench/gpu.sh --dry-run       # the same steps on the CPU at toy sizes, two at a time (~1 minute)
#   options: --out FILE (default bench/results/gpu-<date>.md; with --dry-run, /tmp/instructune-gpu-dry-run.md),
#            PYTHON=<interpreter> (default .venv/bin/python)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DRY=0
OUT=
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT=${2:?--out needs a file}; shift ;;
        -h|--help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench/gpu.sh: unknown argument $1 (--dry-run, --out FILE)" >&2; exit 2 ;;
    esac
    shift
done
WORK=$(mktemp -d "${TMPDIR:-/tmp}/instructune-gpu-XXXXXX")
trap 'rm -rf "$WORK"' EXIT
if [ "$DRY" = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "bench/gpu.sh: $PY sees no CUDA GPU: set up with a CUDA torch (TORCH_SPEC, see scripts/setup.sh), or pass --dry-run" >&2
    exit 2
fi
[ -n "$OUT" ] || OUT=$([ "$DRY" = 1 ] && echo "${TMPDIR:-/tmp}/instructune-gpu-dry-run.md" || echo "bench/results/gpu-$(date +%F).md")

ORDER=()
# step NAME SECONDS COMMAND...: runs COMMAND with a time limit; writes its table row and its section (status, time,
# last line, output) to $WORK/NAME.row and NAME.section.
step() {
    local name=$1 limit=$2 started status seconds last
    shift 2
    echo "== $name (at most ${limit} s): $*" >&2
    started=$(date +%s)
    timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    case $? in
        0) status=ok ;;
        124|137) status="timed out after ${limit} s" ;;
        *) if tail -n 1 "$WORK/$name.log" | grep -q "^skipped"; then status=skipped; else status=failed; fi ;;
    esac
    seconds=$(( $(date +%s) - started ))
    last=$(grep -v '^\s*$' "$WORK/$name.log" | tail -n 1 | cut -c1-300)
    echo "   $name: $status in ${seconds} s: $last" >&2
    echo "| $name | $status | $seconds | \`$last\` |" > "$WORK/$name.row"
    { echo; echo "## $name"; echo; echo "\`$*\` — $status in $seconds s"; echo; echo '```'
      grep -v "it/s]\|s/it]" "$WORK/$name.log" | tail -n 60; echo '```'; } > "$WORK/$name.section"
}
# run NAME SECONDS COMMAND...: on a GPU one step at a time (each is a measurement); in a dry run two at a time (its
# figures are toys: what it shows is that every step runs), so that it takes about a minute.
run() {
    ORDER+=("$1")
    if [ "$DRY" = 0 ]; then step "$@"; return; fi
    [ "$(jobs -rp | wc -l)" -lt 2 ] || wait -n
    OMP_NUM_THREADS=1 step "$@" &
}
skip() { ORDER+=("$1"); echo "| $1 | skipped | 0 | $2 |" > "$WORK/$1.row"; echo "== $1: skipped: $2" >&2; }

MODEL=$WORK/llama-1b
if [ "$DRY" = 1 ]; then
    ORDER+=(model); step model 120 "$PY" bench/random_model.py "$MODEL" --size tiny
    # the longest first (adapters ~28 s, plan ~21, throughput ~16, serve ~13): two slots end closest together
    run adapters 300 "$PY" bench/adapters.py --model "$MODEL" --steps 3
    run plan 300 "$PY" bench/plan.py --model "$MODEL" --nproc 1 --strategies ddp --steps 3 --seq_len 64 --micro_batch 2
    run throughput 300 "$PY" bench/throughput.py --model "$MODEL" --records 200 --examples 12 --batch_size 2 --max_length 128 --pipelines reference padding_free packing
    skip throughput_flash "GPU only (flash-attention)"
    skip throughput_flex "GPU only (flex attention has no backward on the CPU)"
    skip throughput_compile "GPU only (compiling takes minutes on the CPU)"
    run serve 300 "$PY" bench/serve.py --model "$MODEL" --requests 3 --concurrency 1,2 --max_tokens 4 --think_s 0.05 --skip_transformers --skip_one_at_a_time
else
    ORDER+=(model); step model 60 "$PY" bench/random_model.py "$MODEL" --size 1b
    run throughput 90 "$PY" bench/throughput.py --records 3000 --attention sdpa
    if "$PY" -c "import flash_attn" 2>/dev/null; then
        run throughput_flash 40 "$PY" bench/throughput.py --model "$MODEL" --records 2000 --examples 64 --attention flash_attention_2 --pipelines reference padding_free packing
    else
        skip throughput_flash "flash_attn is not installed"
    fi
    run throughput_flex 45 "$PY" bench/throughput.py --model "$MODEL" --records 2000 --examples 64 --attention flex_attention --pipelines reference padding_free packing
    run throughput_compile 75 "$PY" bench/throughput.py --model "$MODEL" --records 2000 --examples 128 --torch_compile --pipelines reference padding_free packing
    run plan 55 "$PY" bench/plan.py --gpu --model "$MODEL" --nproc 1 --steps 4 --seq_len 1024 --micro_batch 4
    run adapters 65 "$PY" bench/adapters.py --model "$MODEL" --steps 8
    run serve 50 "$PY" bench/serve.py --requests 32 --concurrency 1,8,32
fi

wait
MACHINE=$("$PY" -c "import torch, transformers
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'the CPU (dry run)')
print('torch', torch.__version__, '· CUDA', torch.version.cuda, '· transformers', transformers.__version__)" 2>&1)
mkdir -p "$(dirname "$OUT")"
{
    echo "# GPU run of $(date +%F): $(head -n 1 <<< "$MACHINE")"
    echo
    echo "\`bash bench/gpu.sh$([ "$DRY" = 1 ] && echo " --dry-run")\` at commit $(git rev-parse --short HEAD 2>/dev/null || echo "?"); $(tail -n 1 <<< "$MACHINE")."
    echo
    echo "| step | status | seconds | figures (the benchmark's last line) |"
    echo "|---|---|---|---|"
    for name in "${ORDER[@]}"; do cat "$WORK/$name.row"; done
    for name in "${ORDER[@]}"; do [ ! -f "$WORK/$name.section" ] || cat "$WORK/$name.section"; done
} > "$OUT.tmp" && mv "$OUT.tmp" "$OUT"
echo "bench/gpu.sh: wrote $OUT" >&2
for name in "${ORDER[@]}"; do grep -q "| \(ok\|skipped\) |" "$WORK/$name.row" || exit 1; done
