"""Seconds per step and memory per rank of each training strategy, as ratios to DDP, same model and batch.

Every strategy trains SmolLM2-135M (the built-in model) on the sample data with 2 processes
(torchrun), the same seed, batch and sequence length. Per rank it records the median optimizer-step
time (first step excluded), the peak RSS, and the model-state memory the rank holds at the end of
training: its local part of the weights, fp32 master weights and optimizer states. ZeRO-3 and FSDP
shard those, so their model-state memory per rank is below DDP's; ZeRO-2 shards only the optimizer.

    .venv/bin/python bench/strategies.py                        # all strategies, ~8 minutes on 2 CPU cores
    .venv/bin/python bench/strategies.py --strategies ddp zero3 --steps 4
    On a GPU machine, the same command (NPROC=number of GPUs) measures GPU peak memory as well.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ["ddp", "zero2", "zero2_offload", "zero3", "zero3_offload", "fsdp", "fsdp_offload"]


def model_state_bytes(model, optimizer) -> int:
    """Bytes of weights, master weights and optimizer states held by this rank (each tensor once)."""
    import torch

    seen, total = set(), 0

    def add(tensor):
        nonlocal total
        if hasattr(tensor, "ds_tensor"):  # ZeRO-3: the rank's partition of the parameter
            tensor = tensor.ds_tensor
        if hasattr(tensor, "to_local"):  # FSDP2: the rank's shard of a DTensor
            tensor = tensor.to_local()
        if isinstance(tensor, torch.Tensor) and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()

    for parameter in model.parameters():
        add(parameter)
    while hasattr(optimizer, "optimizer"):  # Accelerate and DeepSpeed wrappers → the torch optimizer
        optimizer = optimizer.optimizer
    for group in optimizer.param_groups:  # DeepSpeed's fp32 master partitions are the torch optimizer's params
        for parameter in group["params"]:
            add(parameter)
    for state in optimizer.state.values():
        for value in state.values():
            add(value)
    return total


def worker(output: Path, argv: list[str]) -> int:
    import torch
    from transformers import TrainerCallback

    from instructune.cli import run, train

    class Probe(TrainerCallback):
        def __init__(self):
            self.step_times, self.started = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_times.append(time.perf_counter() - self.started)

        def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            record = {
                "step_seconds": statistics.median(self.step_times[1:] or self.step_times),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "model_state_mb": model_state_bytes(model, optimizer) / 2**20,
            }
            if torch.cuda.is_available():
                record["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
            (output / f"rank{rank}.json").write_text(json.dumps(record))

    return run(lambda: train.main(argv, callbacks=[Probe()]))


def measure(strategy: str, steps: int, nproc: int, work: Path) -> list[dict]:
    out = work / strategy
    out.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "29650",
        __file__, "--worker", str(out), "--model_name_or_path", "smollm2-135m", "--data_path", "alpaca_data.json",
        "--output_dir", str(out / "model"), "--max_steps", str(steps), "--per_device_train_batch_size", "2",
        "--model_max_length", "128", "--learning_rate", "1e-5", "--save_strategy", "no", "--report_to", "none",
        "--disable_tqdm", "True", "--logging_steps", "1", "--seed", "0", "--strategy", strategy,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{strategy} failed:\n{result.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        sys.exit(worker(Path(sys.argv[2]), sys.argv[3:]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES, choices=STRATEGIES)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--nproc", type=int, default=int(os.environ.get("NPROC", 2)))
    args = parser.parse_args()
    strategies = ["ddp"] + [s for s in args.strategies if s != "ddp"]  # DDP is the reference
    with tempfile.TemporaryDirectory() as work:
        results = {s: measure(s, args.steps, args.nproc, Path(work)) for s in strategies}
    reference = results["ddp"]

    def ratio(strategy, key):
        return max(r[key] for r in results[strategy]) / max(r[key] for r in reference)

    keys = ["step_seconds", "peak_rss_mb", "model_state_mb"] + (["peak_gpu_mb"] if "peak_gpu_mb" in reference[0] else [])
    print(f"SmolLM2-135M, {args.nproc} processes, batch 2 x 128 tokens per process, {args.steps} steps; ratios to DDP "
          "(worst rank)")
    print(f"{'strategy':15s}" + "".join(f"{k:>16s}" for k in keys) + "".join(f"{k + ' ratio':>22s}" for k in keys))
    for strategy in strategies:
        worst = {k: max(r[k] for r in results[strategy]) for k in keys}
        print(f"{strategy:15s}" + "".join(f"{worst[k]:16.3f}" for k in keys) + "".join(f"{ratio(strategy, k):22.3f}" for k in keys))
    if "zero3" in results:
        print(f"zero3_model_state_ratio={ratio('zero3', 'model_state_mb'):.3f}")


if __name__ == "__main__":
    main()
