"""The Hugging Face Trainer, with what it lacks here: real FSDP on the CPU, sharded saves, and
checkpoints that count only once complete."""

import functools
from pathlib import Path

from transformers import Trainer

from instructune import distributed
from instructune.checkpoint import resume


class InstructTrainer(Trainer):
    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled and distributed.on_cpu():
            distributed.enable_fsdp_on_cpu(self)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Trainer._save calls save_pretrained with its default 50GB shards; the size is the user's choice.
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if state_dict:
            # A gathered (DeepSpeed, FSDP) state dict holds tied weights twice, as separate copies that
            # save_pretrained cannot recognise; store them once, as an ordinary save does.
            tied = _second_names(model)
            state_dict = {k: v for k, v in state_dict.items() if k not in tied}
        model.save_pretrained = functools.partial(
            type(model).save_pretrained, model, max_shard_size=self.args.max_shard_size
        )
        try:
            super()._save(output_dir, state_dict=state_dict)
        finally:
            del model.save_pretrained

    def _save_checkpoint(self, model, trial) -> None:
        # A folder being (re)written is incomplete until every rank is done: its marker goes first. The
        # Trainer rotates old checkpoints as soon as the main process has written the new one, while
        # other ranks may still be writing theirs; rotation waits for completion here.
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save and folder.is_dir():
            resume.unmark(folder)
        self.accelerator.wait_for_everyone()
        keep, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = keep
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if not (folder / "config.json").exists():  # sharded FSDP/ZeRO checkpoints: make them convertible
                model = self.accelerator.unwrap_model(self.model)
                model.config.save_pretrained(folder)
                if model.generation_config is not None:
                    model.generation_config.save_pretrained(folder)
                self.processing_class.save_pretrained(folder)
            resume.mark_complete(folder, self.state.global_step)
            resume.rotate(folder.parent, keep, self.state.best_model_checkpoint)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Under FSDP with SHARDED_STATE_DICT the Trainer's save_model writes no weights at all; the
        # final model is gathered into a full state dict (every rank joins, rank 0 writes).
        fsdp_sharded = self.is_fsdp_enabled and "FULL" not in str(self.accelerator.state.fsdp_plugin.state_dict_type)
        if fsdp_sharded and not _internal_call:
            self._save(output_dir, state_dict=self.accelerator.get_state_dict(self.model))
        else:
            super().save_model(output_dir, _internal_call)


def _second_names(model) -> set[str]:
    """Names under which a parameter appears after its first name (a tied lm_head)."""
    seen, names = set(), set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            names.add(name)
        seen.add(id(parameter))
    return names
