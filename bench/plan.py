"""The planner against measurement: predicted vs measured peak memory per process, as ratios, for SmolLM2-135M and a
tiny LLaMA under DDP and ZeRO-3 on 2 processes (--nproc; the CPU: peak RSS; on a GPU machine: peak GPU memory).

Each run trains through train.py's own flags on sequences that all reach model_max_length (the sample data's
instructions with long answers, truncated), so that the planned length is the one trained. The planner is given what
it cannot know from a config: the measured footprint of a process that imported everything and joined the process
group (its runtime overhead) and the run's fraction of target positions (where logits are kept).

    .venv/bin/python bench/plan.py          # ~4 minutes on 2 CPU cores
    .venv/bin/python bench/plan.py --gpu    # on a GPU machine: bf16, peak GPU memory (a ~1B model: --model <folder>)

Last line, machine-readable: ratio_<model>_<strategy> = predicted / measured.
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from random_model import random_llama  # bench/ is the script's folder

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


def child(mode: str, flags: list[str]) -> None:
    """One process of the run: trains (or, for 'baseline', only starts up), then prints its peak as JSON."""
    import torch

    sys.path.insert(0, str(REPO))
    from instructune.training import distributed
    from instructune.cli import setup_logging

    setup_logging()
    if mode == "baseline":  # what every training process holds before any model state
        import deepspeed  # noqa: F401
        import transformers  # noqa: F401

        import instructune.training.recipe  # noqa: F401

        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            torch.zeros(1, device="cuda")  # the CUDA context
        torch.distributed.barrier()
    else:
        from instructune.cli.train import main

        assert main(flags) == 0
    peak = (torch.cuda.max_memory_reserved() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print("PEAK " + json.dumps({"rank": int(os.environ.get("RANK", 0)), "peak": peak}))
    distributed.exit_process(0)


def run_processes(mode: str, flags: list[str], port: int, nproc: int) -> int:
    """The largest peak of the run's processes."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                             str(port), __file__, "--child", mode, *flags], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    peaks = [json.loads(found)["peak"] for found in re.findall(r"PEAK (\{.*?\})", result.stdout)]  # lines may interleave
    if result.returncode or len(peaks) != nproc:
        raise SystemExit(f"{mode} {flags[:2]} failed:\n{result.stderr[-3000:]}")
    return max(peaks)


def long_records(path: Path) -> None:
    records = json.loads((REPO / "alpaca_data.json").read_text())
    path.write_text(json.dumps([{**r, "output": (r["output"] + " ") * 200} for r in records]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=argparse.REMAINDER)
    parser.add_argument("--model", default=None, help="one model folder instead of SmolLM2 and the tiny LLaMA")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--micro_batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--gpu", action="store_true", help="bf16 on GPUs: peak GPU memory")
    parser.add_argument("--nproc", type=int, default=2, help="processes (GPUs) per run")
    parser.add_argument("--strategies", nargs="+", default=["ddp", "zero3"], choices=["ddp", "zero3"])
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1:])

    sys.path.insert(0, str(REPO))
    from instructune.modeling.builtin import builtin_model_path
    from instructune.training.plan import Hardware, Workload, plan, shape_of

    work_dir = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    data = work_dir / "long.json"
    long_records(data)
    smollm2 = str(builtin_model_path("smollm2-135m"))
    models = {"model": args.model} if args.model else {"smollm2": smollm2, "tiny": random_llama(work_dir / "tiny")}
    port = iter(range(29650, 29700))
    baseline = run_processes("baseline", [], next(port), args.nproc)
    print(f"runtime overhead (a process that imported everything and joined the group): {baseline / GIB:.2f} GiB")
    ratios, rows = {}, []
    for name, model in models.items():
        for strategy in args.strategies:
            out = work_dir / f"{name}-{strategy}"
            flags = ["--model_name_or_path", model, "--data_path", str(data), "--output_dir", str(out),
                     "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.micro_batch),
                     "--model_max_length", str(args.seq_len), "--learning_rate", "1e-5", "--save_strategy", "no",
                     "--report_to", "none", "--logging_steps", "1", "--disable_tqdm", "True", "--strategy", strategy,
                     *(["--bf16", "True"] if args.gpu else [])]
            measured = run_processes("train", flags, next(port), args.nproc)
            stats = json.loads((out / "train_results.json").read_text())
            fraction = stats["speed"]["target_tokens_per_second"] / stats["speed"]["tokens_per_second"]
            hardware = Hardware(gpus=args.nproc, nodes=1, device="gpu" if args.gpu else "cpu", runtime_overhead=baseline)
            work = Workload(args.seq_len, args.micro_batch, target_fraction=fraction)
            option = next(o for o in plan(shape_of(model), hardware, work) if o.strategy == strategy)
            ratios[f"ratio_{name}_{strategy}"] = option.gpu_total_bytes / measured
            rows.append(f"  {name:8s} {strategy:6s} predicted {option.gpu_total_bytes / GIB:6.2f} GiB  measured "
                        f"{measured / GIB:6.2f} GiB  ratio {option.gpu_total_bytes / measured:5.2f}  (states "
                        f"{option.gpu_model_states_bytes / GIB:.2f}, activations {option.gpu_activations_bytes / GIB:.2f},"
                        f" logits {option.gpu_logits_bytes / GIB:.2f}, targets {fraction:.0%})")
    print(f"\npeak {'GPU memory' if args.gpu else 'RSS'} per process, {args.nproc} processes, micro-batch {args.micro_batch} × "
          f"{args.seq_len} tokens, {args.steps} steps:")
    print("\n".join(rows))
    print(" ".join(f"{k}={v:.3f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
