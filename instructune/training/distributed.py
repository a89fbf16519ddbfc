"""Where and how training is distributed: the workarounds that make the Trainer really distribute on a CPU-only
machine once it runs, and a clean process exit (the strategies behind --strategy, and the adjustments of the command
line for the CPU, are config's: config/argv.py, config/device.py). See the shared notes, cpu-distributed.md.

Without them, on a machine with no GPU DeepSpeed ZeRO-3 fails inside from_pretrained, FSDP silently falls back to
DDP, peft's trainable tokens fail under ZeRO-3, and gloo runs abort at interpreter exit now and then. Each function
says when it can go.
"""

import os
import sys

import torch

from instructune.config.device import on_cpu


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


# Library internals patched here (process-wide), with the signature relied on, as of peft 0.21 and accelerate 1.15;
# tests/test_library_hooks.py fails naming the one that changed.
PATCHED_INTERNALS = {
    "peft.tuners.trainable_tokens.layer.TrainableTokensLayer._collect_token_weights": ("weight", "rows", "embed_dim"),
    "accelerate.state.PartialState._shared_state": None,  # a dict: the distributed type AcceleratorState copies
}


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
