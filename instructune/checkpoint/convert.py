"""DeepSpeed ZeRO-2/3 and FSDP sharded checkpoints → a complete Hugging Face folder.

DeepSpeed's own zero_to_fp32 reads ZeRO shards (lazily: one consolidated tensor at a time), torch's
distributed-checkpoint tools read FSDP's; the folder is written tensor by tensor with the config
and tokenizer that the Trainer saved beside the checkpoint (zero_to_fp32's output has no
config.json), and tied weights stored once (DeepSpeed's safetensors writer fails on them).
No code runs from the checkpoint's pickles (safeload.py), and a half-written checkpoint is one line
that names what is missing, not a traceback.
"""

import tempfile
from pathlib import Path

import torch

from instructune.checkpoint.safeload import check_metadata, weights_only_loading
from instructune.checkpoint.shard import write_model_folder
from instructune.checkpoint.tensorio import later_names
from instructune.errors import UserError


def convert_checkpoint(checkpoint: str | Path, destination: str | Path, dtype: str = "fp32",
                       max_shard_size: str = "5GB", trust: bool = False) -> int:
    """Returns the number of tensors written."""
    checkpoint = Path(checkpoint)
    if (checkpoint / "adapter_config.json").exists():
        raise UserError(f"{checkpoint}: a LoRA checkpoint; its adapter (adapter_model.safetensors) is already complete: "
                        "merge it into its base with instructune merge, or resume from it")
    config_source = next((p for p in (checkpoint, checkpoint.parent) if (p / "config.json").exists()), None)
    if config_source is None:
        raise UserError(f"{checkpoint}: no config.json in the checkpoint folder or beside it")
    with weights_only_loading(checkpoint, trust):
        try:
            if (checkpoint / "latest").exists() or any(checkpoint.glob("global_step*")):
                state = _deepspeed_state(checkpoint)
            elif any(checkpoint.glob("pytorch_model_fsdp_*")):
                state = _fsdp_state(next(checkpoint.glob("pytorch_model_fsdp_*")), trust)
            else:
                raise UserError(f"{checkpoint}: not a DeepSpeed ZeRO checkpoint (latest, global_step*) or an FSDP sharded one")
        except (OSError, EOFError, ValueError, KeyError, RuntimeError) as e:  # the loaders' ways of meeting a half-written file
            raise UserError(f"{checkpoint}: incomplete or damaged checkpoint: {type(e).__name__}: {e}".splitlines()[0]) from None
        tensors = [(name, tuple(v.shape), v.dtype, v.contiguous) for name, v in _without_tied_duplicates(state).items()]
        write_model_folder(tensors, Path(destination), config_source, max_shard_size, dtype)
    return len(tensors)


def _deepspeed_state(checkpoint: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if (checkpoint / "latest").exists():
        tag = (checkpoint / "latest").read_text().strip()
        if not (checkpoint / tag).is_dir():
            raise UserError(f"{checkpoint / 'latest'}: names {tag}, which is missing: the checkpoint is incomplete")
    else:
        tag = sorted(checkpoint.glob("global_step*"))[-1].name
    for kind in ("model", "optim"):
        if not any((checkpoint / tag).glob(f"*{kind}_states.pt")):
            raise UserError(f"{checkpoint / tag}: no *{kind}_states.pt file: the checkpoint is incomplete")
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=tag, lazy_mode=True)


def _fsdp_state(shards: Path, trust: bool) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    check_metadata(shards / ".metadata", trust)
    with tempfile.TemporaryDirectory() as work:
        dcp_to_torch_save(shards, Path(work) / "state.pt")
        # memory-mapped: the mapping outlives the temporary file's name, and pages load one tensor at a time
        state = torch.load(Path(work) / "state.pt", map_location="cpu", weights_only=True, mmap=True)
    return state.get("model", state)  # Accelerate saves {"model": state_dict}


def _without_tied_duplicates(state: dict) -> dict:
    """Tied weights (an lm_head sharing the input embedding) reach us as one object under two names;
    keep the first name, as save_pretrained does."""
    tied = later_names((n, v.data_ptr() if isinstance(v, torch.Tensor) else id(v)) for n, v in state.items())
    return {name: value for name, value in state.items() if name not in tied}
