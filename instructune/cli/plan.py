"""`instructune plan`: per-GPU and per-node memory of every strategy for a model and a workload, which fit, the fastest
that fits, and the command line that runs it; from the model's config only (nothing downloaded)."""

import argparse

from instructune.cli import check_ranges
from instructune.training.plan import Workload

HELP = "will it fit? memory per GPU of every strategy (DDP, ZeRO, FSDP, offload, LoRA, QLoRA) and the command to run"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="instructune plan", description="Memory per GPU and per node of each training "
                                     "strategy, from the model's config (a model folder, config.json, a hub id in the "
                                     "local cache, or a shipped example: llama-2-7b, llama-2-13b, llama-2-70b).")
    parser.add_argument("--model", "--model_name_or_path", dest="model", required=True, help="model folder, config.json, cached hub id or shipped example")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpu_mem", type=float, default=80, help="GiB per GPU")
    parser.add_argument("--cpu_mem", type=float, default=1024, help="GiB of CPU memory per node")
    parser.add_argument("--seq_len", dest="model_max_length", type=int, default=Workload.seq_len,
                        help="tokens per sequence (train.py's --model_max_length)")
    parser.add_argument("--micro_batch", dest="per_device_train_batch_size", type=int, default=Workload.micro_batch,
                        help="sequences per GPU per step (train.py's --per_device_train_batch_size)")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--method", default="sft", choices=("sft", "dpo"),
                        help="dpo: --micro_batch counts pairs (two sequences each), and a frozen reference is counted")
    parser.add_argument("--precompute_ref_log_probs", action="store_true", help="with --method dpo: no reference held")
    parser.add_argument("--lora_r", type=int, default=0, help="plan LoRA adapters of this rank (and choose among adapters)")
    parser.add_argument("--lora_target_modules", default="[q_proj,v_proj]", help="as train.py's flag, or all-linear")
    parser.add_argument("--load_in_4bit", action="store_true", help="with --lora_r: QLoRA")
    parser.add_argument("--device", default="gpu", choices=("gpu", "cpu"),
                        help="cpu: the processes train on the CPU; --gpus is then processes per node and --cpu_mem their memory")
    parser.add_argument("--runtime_overhead", type=float, default=None,
                        help="GiB each process holds before any model state (default: 1 on a GPU, 0.6 on the CPU (measured: bench/plan.py))")
    parser.add_argument("--headroom", type=float, default=0.10, help="fraction of memory kept free (fragmentation)")
    parser.add_argument("--target_fraction", type=float, default=1.0,
                        help="fraction of positions with a target (logits are kept only there); 1 is the safe bound")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON: one object per option")
    args = parser.parse_args(argv)
    check_ranges([("--gpus", args.gpus, 1, 1 << 20), ("--nodes", args.nodes, 1, 1 << 20),
                  ("--gpu_mem", args.gpu_mem, 0.01, 1 << 20), ("--cpu_mem", args.cpu_mem, 0.01, 1 << 30),
                  ("--seq_len", args.model_max_length, 1, 1 << 24),
                  ("--micro_batch", args.per_device_train_batch_size, 1, 1 << 16),
                  ("--lora_r", args.lora_r, 0, 1 << 16), ("--runtime_overhead", args.runtime_overhead or 0, 0, 1 << 20),
                  ("--headroom", args.headroom, 0, 0.99), ("--target_fraction", args.target_fraction, 0.001, 1)])

    from instructune.modeling.adapters import target_modules
    from instructune.training.plan import GIB, Hardware, choose, command_for, plan, shape_of, table, to_json

    hardware = Hardware(args.gpus, args.nodes, args.gpu_mem * GIB, args.cpu_mem * GIB, args.device,
                        None if args.runtime_overhead is None else args.runtime_overhead * GIB, args.headroom)
    work = Workload.from_args(args)
    shape = shape_of(args.model, target_modules(args.lora_target_modules), ranks=(args.lora_r or 8,))
    options = plan(shape, hardware, work)
    for option in options:
        option.command = command_for(option, shape.name, hardware, work)
    chosen = choose(options, work)
    print(to_json(options, chosen) if args.json else table(shape, hardware, work, options, chosen))
    return 0
