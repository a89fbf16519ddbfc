"""Peak memory and wall time of `instructune convert` against DeepSpeed's own zero_to_fp32.py script,
on the same ZeRO-3 checkpoint (2 ranks, optimizer states included) of SmolLM2-135M, or of a random
LLaMA of SmolLM2's vocabulary with --layers N (24 layers: ~420M parameters).

Each conversion runs in a fresh process under a small wrapper that reports that child's peak RSS
(ru_maxrss of its only child) and wall time, imports included. zero_to_fp32.py writes .bin shards:
its safetensors output fails on SmolLM2's tied embeddings, which instructune handles.

    .venv/bin/python bench/convert.py              # ~1 minute on 2 CPU cores: one training step makes the checkpoint
    .venv/bin/python bench/convert.py --layers 24  # a ~420M-parameter random LLaMA: ~5 minutes, ~10 GB of disk

The last line is machine-readable: peak_rss_ratio=X time_ratio=Y (instructune / DeepSpeed).
Goal: peak_rss_ratio <= 1 (lower where streaming allows).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from random_model import random_llama  # noqa: E402  (bench/ is the script's folder)

WRAPPER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
if code.returncode:
    sys.exit(code.stderr[-3000:])
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def measure(command: list[str]) -> dict:
    result = subprocess.run([sys.executable, "-c", WRAPPER, *command], cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{command[:3]} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, help="a random LLaMA with this many layers instead of SmolLM2-135M")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        model = "smollm2-135m"
        if args.layers:
            model = random_llama(work / "random-llama", "420m", args.layers)
        train = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29670", "train.py",
             "--model_name_or_path", model, "--data_path", "alpaca_data.json", "--output_dir", str(work / "run"),
             "--strategy", "zero3", "--max_steps", "1", "--per_device_train_batch_size", "1", "--model_max_length", "64",
             "--save_strategy", "steps", "--save_steps", "1", "--report_to", "none", "--disable_tqdm", "True"],
            cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        if train.returncode:
            sys.exit(f"making the checkpoint failed:\n{train.stderr[-3000:]}")
        checkpoint = work / "run" / "checkpoint-1"
        size = sum(f.stat().st_size for f in (checkpoint / "global_step1").iterdir()) / 2**20
        deepspeed = measure([sys.executable, str(checkpoint / "zero_to_fp32.py"), str(checkpoint), str(work / "ds"),
                             "--max_shard_size", "500MB"])
        ours = measure([sys.executable, "-m", "instructune.cli", "convert", str(checkpoint), str(work / "ours"),
                        "--max_shard_size", "500MB"])
    name = f"a random {args.layers}-layer LLaMA" if args.layers else "SmolLM2-135M"
    print(f"ZeRO-3 checkpoint of {name} from 2 ranks: {size:.0f} MB (weights and optimizer states)")
    print(f"{'tool':22s} {'seconds':>8s} {'peak RSS MB':>12s}")
    print(f"{'zero_to_fp32.py':22s} {deepspeed['seconds']:8.1f} {deepspeed['peak_rss_mb']:12.0f}")
    print(f"{'instructune convert':22s} {ours['seconds']:8.1f} {ours['peak_rss_mb']:12.0f}")
    print(f"peak_rss_ratio={ours['peak_rss_mb'] / deepspeed['peak_rss_mb']:.3f} "
          f"time_ratio={ours['seconds'] / deepspeed['seconds']:.3f}")


if __name__ == "__main__":
    main()
