"""The Hugging Face Trainer, with what it lacks here: real FSDP on the CPU, sharded saves, checkpoints
that count only once complete, a check that flattened batches keep examples apart, the loss on target
positions only, and speed figures in its logs."""

import functools
import inspect
import logging
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from instructune.checkpoint import resume
from instructune.checkpoint.tensorio import later_names
from instructune.config.device import on_cpu
from instructune.data import IGNORE_INDEX
from instructune.errors import UserError
from instructune.training import distributed
from instructune.training.speed import SpeedMeter

logger = logging.getLogger("instructune")


def target_token_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """The causal-LM loss from logits computed at target positions only (`logits_to_keep`, see batching.py).

    The same sum over targets as the model's own loss (labels shifted by one), divided by the targets
    of the whole optimizer step (`num_items_in_batch`, counted by the Trainer across micro-batches and
    ranks), or by this batch's targets when the Trainer gives no count (evaluation)."""
    targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
    logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])
    total = F.cross_entropy(logits.float(), targets, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    return total / count


def supports_target_logits(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft passes it through
    return "logits_to_keep" in inspect.signature(type(base).forward).parameters


# Every private (or internal-flagged) Trainer method relied on here, with the parameters used, as of transformers
# 5.24, and why a public hook (a TrainerCallback, compute_loss, training_step, log) cannot do it.
# tests/test_library_hooks.py fails naming the method if transformers renames one or changes these parameters.
PRIVATE_HOOKS = {
    "_save": ("output_dir", "state_dict"),  # the user's shard size, tied weights stored once: only _save has the dict
    "_save_checkpoint": ("model", "trial"),  # unmark before, mark complete and rotate after every rank has written
    "_get_output_dir": ("trial",),  # the folder _save_checkpoint is about to write
    "create_accelerator_and_postprocess": (),  # real FSDP on the CPU: the accelerator must be changed before prepare
    "save_model": ("output_dir", "_internal_call"),  # FSDP sharded: the final model gathered into a full dict
    # group_by_length from the cache's length column: the Trainer would read every example to measure it
    "_get_train_sampler": ("train_dataset",),
}


class InstructTrainer(Trainer):
    def __init__(self, *args, speed: SpeedMeter | None = None, flat_batches: bool = False, guard=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.speed, self.flat_batches, self.guard = speed, flat_batches, guard
        self.run_id = uuid.uuid4().hex  # in the checkpoints this run completes (their markers)
        self.mask_from_positions = None  # flattened batches: None until checked, then whether to build the mask
        for callback in (speed, guard):
            if callback is not None:
                self.add_callback(callback)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.speed is not None:
            self.speed.count(inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.guard is not None:  # a non-finite loss is caught before the optimizer step (training/guard.py)
            self.guard.loss(loss)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Both training and evaluation come here: flattened batches are checked before the first of either.
        if self.flat_batches and self.mask_from_positions is None:
            self.mask_from_positions = mask_needed_to_keep_examples_apart(model, self.data_collator, self.args.device)
        if self.mask_from_positions:
            inputs = {**inputs, "attention_mask": causal_mask_from_positions(model, inputs["position_ids"])}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if self.speed is not None and "loss" in logs:  # a training log: add this window's speed
            logs.update(self.speed.take_window())
        super().log(logs, start_time)

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=dataset.lengths().tolist())
        return super()._get_train_sampler(train_dataset)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled and on_cpu():
            distributed.enable_fsdp_on_cpu(self)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Trainer._save calls save_pretrained with its default 50GB shards; the size is the user's choice.
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if hasattr(model, "peft_config"):  # an adapter: small, one file, peft's own format
            return super()._save(output_dir, state_dict=state_dict)
        if state_dict:
            # A gathered (DeepSpeed, FSDP) state dict holds tied weights twice, as separate copies that
            # save_pretrained cannot recognise; store them once, as an ordinary save does.
            tied = later_names((n, id(p)) for n, p in model.named_parameters(remove_duplicate=False))
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
            resume.mark_complete(folder, self.state.global_step, self.run_id)
            resume.rotate(folder.parent, keep, self.state.best_model_checkpoint)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Under FSDP with SHARDED_STATE_DICT the Trainer's save_model writes no weights at all; the
        # final model is gathered into a full state dict (every rank joins, rank 0 writes).
        fsdp_sharded = self.is_fsdp_enabled and "FULL" not in str(self.accelerator.state.fsdp_plugin.state_dict_type)
        if fsdp_sharded and not _internal_call:
            self._save(output_dir, state_dict=self.accelerator.get_state_dict(self.model))
        else:
            super().save_model(output_dir, _internal_call)


def mask_needed_to_keep_examples_apart(model, collator, device) -> bool:
    """Before the first flattened step: do examples that share a row stay apart, as they must?

    Two short examples in one batch, then the first one changed: the second one's logits must not
    move. Most families build their block-diagonal mask from the position ids themselves (no mask
    given); some build it without them (OPT): for those, transformers' own mask builder is given the
    position ids (causal_mask_from_positions), checked the same way. Returns whether that mask is
    needed; if neither keeps the examples apart, the run stops rather than learn from the wrong context.
    Runs through the wrapped model (DDP, FSDP, DeepSpeed gather what they need), on every rank, in eval
    mode (dropout off), with the collator's own batches: the path training takes.
    """
    first = {"input_ids": [5, 6, 7, 8, 9, 10], "labels": [IGNORE_INDEX] * 3 + [8, 9, 10]}
    second = {"input_ids": [11, 12, 13, 14, 15], "labels": [IGNORE_INDEX] * 2 + [13, 14, 15]}
    changed = {**first, "input_ids": [16, 17, 18, 19, 20, 21]}

    def second_logits(pair, with_mask: bool) -> torch.Tensor:
        batch = on_device(collator([pair]), device)  # a packed row
        batch.pop("labels")
        batch.pop("logits_to_keep", None)  # all positions: the second example's are the last five
        if with_mask:
            batch["attention_mask"] = causal_mask_from_positions(model, batch["position_ids"])
        return model(**batch).logits[0, -len(second["input_ids"]):].float()

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            moved = {}
            for with_mask in (False, True):
                before, after = second_logits([first, second], with_mask), second_logits([changed, second], with_mask)
                moved[with_mask] = (before - after).abs().max().item()
                if moved[with_mask] <= 1e-4 * (1 + before.abs().max().item()):
                    if with_mask:
                        logger.info("flattened batches: %s builds its attention mask without the position ids; "
                                    "giving it the block-diagonal mask built from them", _model_name(model))
                    return with_mask
    finally:
        model.train(was_training)
    attention = getattr(extract_model_from_parallel(model).config, "_attn_implementation", "?")
    raise UserError(f"{_model_name(model)} with attn_implementation={attention} lets examples in one flattened row attend "
                    f"to each other (an example's logits moved by {moved[False]:.2g} when another changed, "
                    f"{moved[True]:.2g} with a block-diagonal mask), so --padding_free/--packing cannot train it "
                    "exactly; train without them (padded batches; --group_by_length True keeps padding low)")


def on_device(batch: dict, device) -> dict:
    """A collated batch's tensors moved to the run's device (what the Trainer does to the batches it reads)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def causal_mask_from_positions(model, position_ids: torch.Tensor):
    """transformers' block-diagonal causal mask for these position ids, in the form the model's attention
    implementation takes (a 4-D mask, which the model then uses as it is)."""
    from transformers.masking_utils import create_causal_mask

    unwrapped = extract_model_from_parallel(model)
    dtype = unwrapped.get_input_embeddings().weight.dtype
    shape_only = torch.empty(*position_ids.shape, 1, dtype=dtype, device=position_ids.device)  # batch, length, dtype
    return create_causal_mask(config=unwrapped.config.get_text_config(), inputs_embeds=shape_only, attention_mask=None,
                              cache=None, position_ids=position_ids)


def _model_name(model) -> str:
    return type(extract_model_from_parallel(model)).__name__
