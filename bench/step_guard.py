"""What the step guard costs (training/guard.py): the one all-reduce of two flags that every optimizer step makes so
that all ranks agree on a signal or a non-finite loss, as a fraction of a training step of the same 2 processes.

Both are measured in the same run, on 2 gloo processes: the guard's `agree` (after warm-up, the mean of --calls), and
a DDP step of the model (forward, backward with its gradient all-reduce, AdamW) on --batch x --seq_len tokens.

    .venv/bin/python bench/step_guard.py                      # SmolLM2-135M (built in), ~1 minute on 2 CPU cores
    .venv/bin/python bench/step_guard.py --model <folder> --batch 8 --seq_len 512

Last line, machine-readable: guard_us, step_s, guard_fraction.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from instructune.modeling.models import resolve_model_path
    from instructune.training.guard import StepGuard

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    guard = StepGuard([], 0, torch.device("cpu"))
    for _ in range(100):
        guard.agree(False, False)
    torch.distributed.barrier()
    start = time.perf_counter()
    for _ in range(args.calls):
        guard.agree(False, False)
    guard_s = (time.perf_counter() - start) / args.calls

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model), dtype=torch.float32)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    tokens = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len))
    times = []
    for _ in range(args.steps + 1):  # the first is warm-up
        start = time.perf_counter()
        ddp(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    step_s = sum(times[1:]) / args.steps
    if rank == 0:
        print(json.dumps({"guard_us": guard_s * 1e6, "step_s": step_s, "guard_fraction": guard_s / step_s}))
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29561", __file__, "--worker", *sys.argv[1:]], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode:
        sys.exit(result.stderr[-3000:])
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"step guard: {figures['guard_us']:.0f} µs per optimizer step; a DDP step of {args.model} "
          f"({args.batch} x {args.seq_len} tokens per process, 2 processes): {figures['step_s']:.2f} s; "
          f"the guard is {figures['guard_fraction']:.2e} of the step")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
