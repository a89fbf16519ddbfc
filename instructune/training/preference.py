"""Preference tuning (--method dpo): DPO's loss, or IPO's, on chosen/rejected pairs, against a frozen reference.

A batch holds each pair's chosen conversation, then each one's rejected (data/batching.py, `pairs`), padded together:
one forward of the policy gives every sequence's summed log-probability of its reply tokens. The reference's come
from one of three places, none of them a second whole model per rank where the policy is split:
- with an adapter (LoRA, QLoRA), the same model with the adapter disabled: the base, no second copy;
- otherwise a frozen copy of the starting model, prepared like the policy: partitioned by ZeRO-3 or FSDP, a whole
  copy per rank under DDP and ZeRO-1/2 (which hold whole weights per rank anyway);
- with --precompute_ref_log_probs, computed once before the first step (by the starting policy, or the base with
  its adapter disabled) and cached beside the tokenised data, so that no reference is held at all.

The loss is TRL's (`DPOTrainer`, loss_type sigmoid or ipo, IPO's log-ratios averaged per reply token as TRL does);
the rewards logged are β × the log-ratios, as TRL logs them (rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies). The loss is a mean over the pairs of a micro-batch, divided by the accumulation steps, and the
ranks' gradients are averaged: every pair of an optimizer step weighs the same.
"""

import copy
import hashlib
import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from instructune.data.batching import next_token_is_target
from instructune.errors import UserError
from instructune.files import atomic_file
from instructune.training.trainer import InstructTrainer, on_device

logger = logging.getLogger("instructune")

LOSSES = ("sigmoid", "ipo")
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's target tokens, their count), from logits at every position
    ([rows, length, vocab]) or at the target-predicting positions only (`logits_to_keep`, in row order)."""
    keep = next_token_is_target(labels)
    targets = labels[:, 1:][keep[:, :-1]]
    logits = logits[keep] if logits.dim() == 3 and logits.shape[:2] == labels.shape else logits.reshape(-1, logits.shape[-1])
    logits = logits.float()
    token_log_probs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=token_log_probs.dtype, device=labels.device)
    return sums.index_add(0, rows, token_log_probs), keep.sum(dim=1)


def preference_loss(policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor, beta: float,
                    kind: str = "sigmoid") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean loss over the pairs, and each pair's rewards. `policy`, `reference`, `counts`: per sequence, the
    chosen ones then the rejected ones."""
    chosen_ratio, rejected_ratio = (policy - reference).chunk(2)
    if kind == "sigmoid":  # DPO: -log σ(β (log-ratio of chosen − log-ratio of rejected))
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif kind == "ipo":  # IPO: ((per-token log-ratio of chosen − of rejected) − 1/(2β))²
        chosen_tokens, rejected_tokens = counts.clamp(min=1).chunk(2)
        losses = (chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {kind!r}; choose one of {', '.join(LOSSES)}")
    chosen, rejected = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    rewards = dict(zip(REWARDS, (chosen, rejected, chosen - rejected, (chosen > rejected).float())))
    return losses.mean(), rewards


@dataclass(frozen=True)
class Preference:
    beta: float = 0.1
    loss: str = "sigmoid"
    reference_cache: Path | None = None  # --precompute_ref_log_probs: where the reference's log-probs are kept


class PreferenceTrainer(InstructTrainer):
    """The Trainer with the preference loss in compute_loss (a public hook) and the rewards in its logs."""

    loss_is_scaled_for_ga = False  # a mean over the micro-batch's pairs: the Trainer divides by accumulation steps

    def __init__(self, *args, preference: Preference, reference=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.preference = preference
        self.reference = prepare_reference(self, reference) if reference is not None else None
        self.rewards = {"train": defaultdict(list), "eval": defaultdict(list)}  # since the last log
        if preference.reference_cache is not None:
            self.add_callback(PrecomputeReference(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels, reference = inputs.pop("labels"), inputs.pop("reference_log_probs", None)
        outputs = model(**inputs)  # no labels: no language-model loss computed beside this one
        policy, counts = sequence_log_probs(outputs.logits, labels)
        if reference is None:
            reference = self.reference_log_probs(model, inputs, labels)
        loss, rewards = preference_loss(policy, reference.to(policy.dtype), counts, self.preference.beta,
                                        self.preference.loss)
        stored = self.rewards["train" if model.training else "eval"]
        for name, values in rewards.items():
            stored[name].append(values.mean().item())
        return (loss, outputs) if return_outputs else loss

    def reference_log_probs(self, model, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        """The reference's summed log-probs of the same sequences: the frozen copy's, the adapter-disabled base's (run
        through the wrapped model, which DDP, ZeRO-3 and FSDP need every rank to call), or, precomputing before the
        first step, the starting policy's."""
        with torch.no_grad():
            if self.reference is not None:
                logits = self.reference(**inputs).logits
            elif hasattr(unwrapped := self.accelerator.unwrap_model(model), "peft_config"):
                with unwrapped.disable_adapter():
                    logits = model(**inputs).logits
            elif self.preference.reference_cache is not None and self.state.global_step == 0:
                logits = model(**inputs).logits
            else:
                raise RuntimeError("DPO needs a reference: a frozen copy, an adapter to disable, or precomputed log-probs")
        return sequence_log_probs(logits, labels)[0]

    def reference_summary(self) -> dict:
        """Where the reference came from, and how many of its weights this process held (the run summary)."""
        if self.preference.reference_cache is not None:
            return {"reference": "precomputed", "log_probs": str(self.preference.reference_cache), "held_weights": 0}
        if self.reference is None:
            return {"reference": "the base model, adapter disabled", "held_weights": 0}
        return {"reference": "frozen copy", "wrapper": type(self.reference).__name__,
                "held_weights": held_elements(self.reference)}

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, on_device(inputs, self.args.device))
        return loss.detach(), None, None

    def log(self, logs: dict, start_time: float | None = None) -> None:
        # Every rank logs (the Trainer calls log on each): the means since the last log are averaged across ranks.
        mode, prefix = ("eval", "eval_") if "eval_loss" in logs else ("train", "")
        stored = self.rewards[mode]
        if stored and (mode == "eval" or "loss" in logs):
            means = torch.tensor([sum(v) / len(v) for v in stored.values()], device=self.args.device)
            means = self.accelerator.reduce(means, reduction="mean") if self.args.world_size > 1 else means
            logs.update({prefix + name: round(value, 6) for name, value in zip(stored, means.tolist())})
            stored.clear()
        super().log(logs, start_time)


def prepare_reference(trainer, reference: torch.nn.Module) -> torch.nn.Module:
    """The frozen reference, placed like the policy: partitioned under ZeRO-3 (loaded partitioned: from_pretrained
    runs under the run's zero.Init) and FSDP; whole, on the run's device, under DDP and ZeRO-1/2."""
    reference.eval()
    reference.requires_grad_(False)
    if trainer.is_deepspeed_enabled:
        import deepspeed

        config = copy.deepcopy(trainer.accelerator.state.deepspeed_plugin.deepspeed_config)
        for training_only in ("optimizer", "scheduler"):  # nothing is trained: no optimizer to build or offload
            config.pop(training_only, None)
        zero = config.setdefault("zero_optimization", {})
        zero.pop("offload_optimizer", None)
        if zero.get("stage") != 3:
            zero["stage"] = 0
        # What the Trainer fills in for the policy only when training starts (transformers' deepspeed.py)
        hidden = reference.config.get_text_config().hidden_size
        for key, value in (("reduce_bucket_size", hidden * hidden), ("stage3_param_persistence_threshold", 10 * hidden),
                           ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))):
            if zero.get(key) == "auto":
                zero[key] = value
        reference, *_ = deepspeed.initialize(model=reference, config=config)
    elif trainer.is_fsdp_enabled:
        from accelerate.utils import fsdp2_prepare_model

        reference = fsdp2_prepare_model(trainer.accelerator, reference)
    else:
        reference = reference.to(trainer.args.device)
    reference.eval()  # the engine's eval() returns nothing
    return reference


def held_elements(module: torch.nn.Module) -> int:
    """Weights this process holds: its ZeRO-3 partition, its FSDP shard, or all of them."""
    def local(p):
        return p.ds_tensor if hasattr(p, "ds_tensor") else p.to_local() if hasattr(p, "to_local") else p
    return sum(local(p).numel() for p in module.parameters())


def reference_cache_path(data_folder: Path, model_path: str, settings: dict) -> Path:
    """Where the reference log-probs of this tokenised data, by this starting model loaded with these settings
    (precision, quantisation), are kept: beside the cache entry (which stays as it was written)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    model = Path(model_path)
    for path in sorted(model.rglob("*") if model.is_dir() else []):  # a changed weight file changes the key
        if path.is_file():
            digest.update(f"{path.relative_to(model)}\0{path.stat().st_size}\0{path.stat().st_mtime_ns}\0".encode())
    digest.update(str(model.resolve() if model.exists() else model_path).encode())
    return data_folder.with_name(data_folder.name + ".reference") / f"{digest.hexdigest()[:24]}.npy"


class PrecomputeReference(TrainerCallback):
    """--precompute_ref_log_probs: before the first step (the model wrapped, not yet trained), the reference's log-probs
    of every pair in the training and held-out sets, or those cached by an earlier run."""

    def __init__(self, trainer: PreferenceTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        datasets = [d for d in (trainer.train_dataset, trainer.eval_dataset) if d is not None]
        path = trainer.preference.reference_cache
        if path.exists():
            values = np.load(path)
            logger.info("reference log-probs: %s", path)
        elif state.global_step > 0:
            raise UserError(f"{path}: the reference log-probs this run computed before its first step are gone, and the "
                            "resumed model is no longer the reference; resume without --precompute_ref_log_probs, or "
                            "start again")
        else:
            rows = np.unique(np.concatenate([d.indices for d in datasets]))
            values = np.full((len(datasets[0].rows), 2), np.nan, dtype=np.float32)
            values[rows] = self.compute(rows)
            if trainer.is_world_process_zero():
                with atomic_file(path, "wb") as f:
                    np.save(f, values)
                logger.info("reference log-probs of %d pairs computed and cached: %s", len(rows), path)
        for dataset in datasets:
            dataset.reference = values

    def compute(self, rows: np.ndarray) -> np.ndarray:
        """Each rank computes an equal share (the last one padded with repeats: ZeRO-3 and FSDP need every rank in
        every forward), then the shares are gathered."""
        from tqdm.auto import tqdm

        trainer = self.trainer
        model, ranks, rank = trainer.model_wrapped, trainer.args.world_size, trainer.args.process_index
        share = math.ceil(len(rows) / ranks)
        mine = np.resize(rows, share * ranks)[rank * share:(rank + 1) * share]
        size = trainer.args.per_device_eval_batch_size
        dataset = trainer.train_dataset
        was_training = model.training
        model.eval()
        results = []
        try:
            for start in tqdm(range(0, share, size), desc="reference log-probs",
                              disable=trainer.args.disable_tqdm or not trainer.is_world_process_zero()):
                batch = on_device(trainer.data_collator(dataset.read(mine[start:start + size])), trainer.args.device)
                labels = batch.pop("labels")
                with trainer.compute_loss_context_manager():  # the precision the live reference would run in
                    results.append(trainer.reference_log_probs(model, batch, labels).view(2, -1).T)
        finally:
            model.train(was_training)
        values = torch.cat(results)
        if ranks > 1:
            values = trainer.accelerator.gather(values)
        return values[:len(rows)].float().cpu().numpy()
