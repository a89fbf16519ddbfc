#!/usr/bin/env bash
# A DeepSpeed ZeRO checkpoint (a checkpoint-N/ folder, or an output_dir with global_stepN/ and latest)
# → a complete Hugging Face folder with sharded safetensors, config and tokenizer.
#   scripts/zero_to_hf.sh runs/llama2-7b/checkpoint-2000 runs/llama2-7b-hf [--dtype bf16] [--max_shard_size 5GB]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
exec "${PYTHON:-$repo/.venv/bin/python}" -m instructune.cli convert "$@"
