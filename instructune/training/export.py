"""Export stage: the trained model as a plain Hugging Face folder, plus what the run did.

An output folder never holds two runs: one that already holds files is refused unless the run resumes
from it or is told to overwrite it, and the final model is written into a staging folder and then
moved into place, replacing any weights that were there, so no stale shard is left beside new ones.
`trainer.save_model` writes weights (sharded safetensors), config, generation config and tokenizer;
it is the one save that is right under ZeRO-3 and FSDP (Alpaca's `state_dict()` save writes empty
tensors under ZeRO-3), and where ZeRO-3 saves only its shards they are consolidated here. Beside it go `train_results.json` (metrics,
prompt template, world size, strategy, data statistics, speed, the loss history) and `loss_curve.png`.
"""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from instructune.data import DataStats
from instructune.errors import ConfigError, UserError
from instructune.files import atomic_file, fsync_tree, out_of_space, png_figure, refuse_output_over_inputs
from instructune.modeling.adapters import is_adapter
from instructune.run_summary import RUN_SUMMARY
from instructune.training.guard import clear_note

STAGING = ".final-model.partial"  # inside output_dir, so that the moves into place are renames
WEIGHT_FILES = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")
MERGED = "merged"  # with --merge_adapter: the base model with the adapter merged in


def prepare_output_dir(args, inputs: dict[str, list[str]]) -> None:
    """Refuse an output_dir that would mix runs, or that is, holds or lies inside one of the run's `inputs`
    ({what: paths}: base model, data, config files); with --overwrite_output_dir, empty it (main process first)."""
    output_dir = Path(args.output_dir)
    refuse_output_over_inputs(output_dir, inputs, "--output_dir")
    with args.main_process_first(desc="preparing the output folder"):
        held = sorted(p.name for p in output_dir.iterdir() if p.name != STAGING) if output_dir.is_dir() else []
        if held and args.overwrite_output_dir and not args.resume_from_checkpoint:  # resuming keeps its checkpoints
            if args.should_save:
                for name in held:
                    path = output_dir / name
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        elif held and not args.resume_from_checkpoint:
            shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
            raise ConfigError(f"{output_dir}: already holds files ({shown}); pass --overwrite_output_dir True to "
                              "replace them or --resume_from_checkpoint auto to continue that run")


def training_strategy(trainer) -> str:
    if trainer.is_deepspeed_enabled:
        return f"deepspeed-zero{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    if trainer.is_fsdp_enabled:
        return "fsdp"
    return "ddp" if trainer.args.world_size > 1 else "single-process"


def loss_history(trainer, key: str = "loss") -> list[dict]:
    """[{step, loss}] of the training loss, or of the held-out loss with key='eval_loss'."""
    return [{"step": e["step"], "loss": e[key]} for e in trainer.state.log_history if key in e]


def save_model_folder(trainer, metrics: dict, data_stats: DataStats, speed: dict, prompt_template: str) -> None:
    """Save the model and the run summary into args.output_dir (the summary from the main process only)."""
    output_dir = Path(trainer.args.output_dir)
    staging = output_dir / STAGING
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
    trainer.accelerator.wait_for_everyone()
    try:
        trainer.save_model(str(staging))  # every rank takes part (ZeRO-3 and FSDP gather); the main process writes
        if not trainer.is_world_process_zero():
            return
        if trainer.is_deepspeed_enabled and not any(staging.glob("model*.safetensors")) and not is_adapter(staging):
            consolidate_zero_checkpoint(trainer, staging)
    except Exception as e:
        if not out_of_space(e):
            raise
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"no space left while writing {output_dir}; the model was not saved (complete checkpoints "
                        "are intact)") from None
    fsync_tree(staging)  # on disk before it replaces the earlier model
    move_into_place(staging, output_dir)
    losses = loss_history(trainer)
    summary = {
        "metrics": metrics,
        "prompt_template": prompt_template,  # generate and serve build prompts with it
        "model_max_length": trainer.args.model_max_length,  # the training length (serving uses the model's context)
        "world_size": trainer.args.world_size,
        "strategy": training_strategy(trainer),
        "model_wrapper": type(trainer.model_wrapped).__name__,
        "data": asdict(data_stats),
        "speed": speed,
        "losses": losses,
        "heldout_losses": loss_history(trainer, "eval_loss"),
        "lm_eval": [e for e in trainer.state.log_history if any(k.startswith("lm_eval/") for k in e)],
        "method": trainer.args.method,
    }
    if trainer.args.method == "dpo":  # the reference, and the rewards at every log, training's and held-out's
        summary["preference"] = {"beta": trainer.args.beta, "loss": trainer.args.dpo_loss, **trainer.reference_summary()}
        summary["rewards"] = [{k: v for k, v in e.items() if "rewards/" in k or k == "step"}
                              for e in trainer.state.log_history if any("rewards/" in k for k in e)]
    with atomic_file(output_dir / RUN_SUMMARY) as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    clear_note(output_dir)  # the run is complete: rerunning the command starts a new one
    if losses:
        plot_loss_curve(losses, output_dir / "loss_curve.png")


def move_into_place(staging: Path, output_dir: Path) -> None:
    """Replace output_dir's model files with the staged ones (old weights first, so none is left over)."""
    for pattern in WEIGHT_FILES:
        for stale in output_dir.glob(pattern):
            stale.unlink()
    shutil.rmtree(output_dir / MERGED, ignore_errors=True)  # an earlier adapter's merge
    for file in staging.iterdir():
        file.replace(output_dir / file.name)
    staging.rmdir()


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
    with png_figure(path) as (_, axes):
        axes.plot([e["step"] for e in losses], [e["loss"] for e in losses], marker="." if len(losses) < 50 else None)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("training loss")
        axes.set_title("instructune: training loss")
        axes.grid(alpha=0.3)
