"""A callback that records what a training run really did, per rank, into DIRECTORY/probe-rank{N}.json:
whether gradient checkpointing is on, and the dtype of an attention projection's output in a training
forward (bfloat16 under --bf16, whether by autocast, DeepSpeed's bf16 weights or FSDP mixed precision)."""

import json
from pathlib import Path

import torch
from transformers import TrainerCallback


class ProbeTraining(TrainerCallback):
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.seen = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.seen["gradient_checkpointing"] = bool(model.is_activation_checkpointing)  # v5 name of is_gradient_checkpointing
        projection = next(m for name, m in model.named_modules() if name.endswith(("q_proj", "self_attn.q_proj")))

        def record(module, inputs, output):
            if module.training:
                self.seen.setdefault("forward_dtype", str(output.dtype).removeprefix("torch."))

        projection.register_forward_hook(record)

    def on_train_end(self, args, state, control, **kwargs):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        (self.directory / f"probe-rank{rank}.json").write_text(json.dumps(self.seen))


def read_probes(directory: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(directory).glob("probe-rank*.json"))]
