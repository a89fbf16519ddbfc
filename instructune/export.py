"""Export stage: the trained model as a plain Hugging Face folder, plus what the run did.

`trainer.save_model` writes weights (sharded safetensors), config, generation config and tokenizer;
it is the one save that is right under ZeRO-3 and FSDP. Beside it go `train_results.json` (metrics,
world size, strategy, data statistics, the loss history) and `loss_curve.png`.
"""

import json
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
