"""Export stage: the trained model as a plain Hugging Face folder, plus what the run did.

`trainer.save_model` writes weights (sharded safetensors), config, generation config and tokenizer;
it is the one save that is right under ZeRO-3 and FSDP (Alpaca's `state_dict()` save writes empty
tensors under ZeRO-3), and where ZeRO-3 saves only its shards they are consolidated here. Beside it go `train_results.json` (metrics,
world size, strategy, data statistics, the loss history) and `loss_curve.png`.
"""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from instructune.data import EncodeStats


def training_strategy(trainer) -> str:
    if trainer.is_deepspeed_enabled:
        return f"deepspeed-zero{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    if trainer.is_fsdp_enabled:
        return "fsdp"
    return "ddp" if trainer.args.world_size > 1 else "single-process"


def loss_history(trainer) -> list[dict]:
    return [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e]


def save_model_folder(trainer, metrics: dict, data_stats: EncodeStats) -> None:
    """Save the model and the run summary into args.output_dir (the summary from the main process only)."""
    trainer.save_model()
    if not trainer.is_world_process_zero():
        return
    output_dir = Path(trainer.args.output_dir)
    if trainer.is_deepspeed_enabled and not any(output_dir.glob("model*.safetensors")):
        consolidate_zero_checkpoint(trainer, output_dir)
    losses = loss_history(trainer)
    summary = {
        "metrics": metrics,
        "world_size": trainer.args.world_size,
        "strategy": training_strategy(trainer),
        "model_wrapper": type(trainer.model_wrapped).__name__,
        "data": asdict(data_stats),
        "losses": losses,
    }
    (output_dir / "train_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    if losses:
        plot_loss_curve(losses, output_dir / "loss_curve.png")


def consolidate_zero_checkpoint(trainer, output_dir: Path) -> None:
    """ZeRO-3 without stage3_gather_16bit_weights_on_model_save (Alpaca's own offload config) saves
    only the sharded DeepSpeed checkpoint; turn it into the fp32 Hugging Face folder users expect.

    DeepSpeed's zero_to_fp32 reads the shards; save_pretrained writes them (it knows which weights are
    tied, which DeepSpeed's own safetensors writer trips over).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(output_dir))
    trainer._save(str(output_dir), state_dict=state_dict)
    for leftover in ("latest", "zero_to_fp32.py", "zero_to_torch.py", *(p.name for p in output_dir.glob("global_step*"))):
        path = output_dir / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def plot_loss_curve(losses: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot([e["step"] for e in losses], [e["loss"] for e in losses], marker="." if len(losses) < 50 else None)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss")
    axes.set_title("instructune: training loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
