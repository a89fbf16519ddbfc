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
        model.save_pretrained = functools.partial(
            type(model).save_pretrained, model, max_shard_size=self.args.max_shard_size
        )
        try:
            super()._save(output_dir, state_dict=state_dict)
        finally:
            del model.save_pretrained

    def _save_checkpoint(self, model, trial) -> None:
        # The Trainer rotates old checkpoints as soon as the main process has written the new one,
        # while other ranks may still be writing theirs; rotation waits for completion here.
        keep, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = keep
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            resume.mark_complete(folder)
            resume.rotate(folder.parent, keep, self.state.best_model_checkpoint)
