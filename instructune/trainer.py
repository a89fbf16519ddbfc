"""The Hugging Face Trainer, with the two things it lacks here: real FSDP on the CPU, and sharded saves."""

import functools

from transformers import Trainer

from instructune import distributed


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
