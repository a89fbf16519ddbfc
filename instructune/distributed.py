"""Where and how training is distributed: the adjustments that make the Trainer really distribute on a
CPU-only machine, and a clean process exit (the strategies behind --strategy are in config/argv.py).
Every CPU-only workaround lives here (see the shared notes, cpu-distributed.md).

Without them, on a machine with no GPU the Trainer silently trains each torchrun rank alone,
DeepSpeed ZeRO-3 fails inside from_pretrained, FSDP silently falls back to DDP, and gloo runs abort
at interpreter exit now and then. Each function says when it can go.
"""

import logging
import os
import sys

import torch

logger = logging.getLogger("instructune")


def main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def adjust_flags_for_device(argv: list[str]) -> list[str]:
    """On a machine without CUDA: train on the CPU without being told, and drop CUDA-only flags."""
    if not on_cpu():
        return argv
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed otherwise probes for CUDA first
    argv = list(argv)
    if "--tf32" in argv:
        # TrainingArguments raises for --tf32 True without an Ampere GPU; Alpaca's command passes it.
        i = argv.index("--tf32")
        has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        del argv[i : i + 1 + has_value]
        logger.info("--tf32 ignored: no CUDA GPU on this machine")
    if "--use_cpu" not in argv:
        # Without use_cpu, Accelerate finds no device backend and each torchrun rank trains alone,
        # unwrapped, on the full data, while all of them write the same output_dir.
        argv += ["--use_cpu", "True"]
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            logger.info(f"no GPU: training on the CPU, {os.environ['WORLD_SIZE']} processes over gloo")
        else:
            logger.info("no GPU: training on the CPU")
    return argv


def adjust_args_for_device(args) -> None:
    """After parsing: DeepSpeed with optimizer offload keeps torch's AdamW on a CPU-only machine, and bf16 on a
    CPU without bf16 arithmetic gets a warning.

    Accelerate would swap in DeepSpeedCPUAdam, a C++ extension that g++ builds on first use (35 s,
    2 GB of compiler memory) to do on the CPU what torch's AdamW already does there.
    """
    if on_cpu() and args.deepspeed:
        args.hf_deepspeed_config.config["zero_force_ds_cpu_optimizer"] = False
    if on_cpu() and args.bf16 and not cpu_has_bf16() and main_process():
        logger.warning("--bf16 on a CPU without bf16 instructions (AVX-512-BF16 or AMX): every bf16 operation is "
                       "emulated, many times slower than fp32; drop --bf16 to train in fp32")


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU computes in bf16 natively (x86 flags avx512_bf16 or amx_bf16; other machines: assumed yes)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in open(cpuinfo) if line.startswith("flags")), None)
    except OSError:
        return True
    return flags is None or bool({"avx512_bf16", "amx_bf16"} & set(flags))


def init_deepspeed_comm(args) -> None:
    """DeepSpeed on the CPU: have deepspeed.comm join the gloo process group before the model is loaded.

    transformers runs deepspeed.zero.Init() inside from_pretrained under ZeRO-3, which needs
    deepspeed.comm ready; on GPUs Accelerate does this in time, on the CPU it does not.
    """
    if args.deepspeed and on_cpu() and args.world_size > 1:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")


def enable_fsdp_on_cpu(trainer) -> None:
    """Make the Trainer's FSDP2 real on the CPU, where Accelerate silently replaces it with DDP.

    Accelerate only switches to FSDP for GPU-like distributed types (accelerate/state.py); the
    torch FSDP2 code itself runs fine on gloo. Can go when Accelerate accepts MULTI_CPU there.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy

    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    if plugin.cpu_offload:
        plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)  # pinning needs an accelerator
    if trainer.accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(trainer.accelerator.mixed_precision)
    state = trainer.accelerator.state
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # AcceleratorState copies PartialState's dict when constructed again (e.g. at save time).
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def peft_trainable_tokens_on_cpu() -> None:
    """ZeRO-3 on the CPU: let peft's trainable token rows (a pad token added under LoRA) be read from the
    partitioned embedding.

    peft gathers the embedding and broadcasts the rows from a buffer it builds on CUDA ("only CUDA is
    implemented"), which fails without a GPU. Inside the gather every rank holds the whole table, so
    each can take the rows itself. Can go when peft builds that buffer on the process group's device.
    """
    import deepspeed
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    def rows_of_gathered_weight(self, weight, rows, embed_dim):
        with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
            return weight[rows].clone()

    TrainableTokensLayer._collect_token_weights = rows_of_gathered_weight


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def exit_process(code: int = 0) -> None:
    """End a training process without the gloo abort at interpreter exit.

    Ranks that simply return sometimes die in a C++ destructor ('terminate called without an active
    exception'), failing the whole torchrun job after a good run; synchronising, tearing the
    process group down and leaving with os._exit avoids it.
    """
    if is_initialized():
        if code == 0:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
