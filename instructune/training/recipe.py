"""The training story, top to bottom: config → data → model → Trainer → export.

Everything that can fail on the user's input (data, tokenizer) runs before the model is loaded and
before anything is written, so a bad record costs seconds and leaves no half-made output folder.
"""

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled

from instructune.checkpoint import resume
from instructune.config import DataArguments, ModelArguments, TrainingArguments, shipped
from instructune.config.device import on_cpu
from instructune.data import DatasetSpec, DataStats, hold_out, parse_datasets
from instructune.data.batching import Collator
from instructune.data.cache import Encoding, prepare
from instructune.data.formats import PAIR_FORMATS
from instructune.errors import ConfigError, DataError, UserError
from instructune.eval.harness import LmEvalCallback
from instructune.modeling import adapters, models
from instructune.training import distributed, guard, precision, preference
from instructune.training.export import MERGED, loss_history, prepare_output_dir, save_model_folder
from instructune.training.speed import SpeedMeter
from instructune.training.trainer import InstructTrainer, supports_target_logits, target_token_loss

logger = logging.getLogger("instructune")


@dataclass
class TrainOutcome:
    metrics: dict
    data: DataStats
    losses: list[float]  # training loss at every logged step
    heldout_losses: list[float]  # validation loss at every evaluation: before training, ..., after
    preempted_at: int | None = None  # the step whose checkpoint a signal made the run save before it stopped


def resume_point(args: TrainingArguments) -> str | None:
    """--resume_from_checkpoint PATH, checked complete; 'auto': the last completed checkpoint in output_dir, if
    any, chosen by the main process and received by every other (all ranks resume the same one)."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint != "auto":
        return str(resume.check_resumable(args.resume_from_checkpoint))
    chosen = [None, None]  # the checkpoint, or why it cannot be resumed: every rank raises the same error
    if args.process_index == 0:
        latest = resume.latest_complete(args.output_dir)
        logger.info("resuming from %s" if latest else "no complete checkpoint in %s: starting from the beginning",
                    latest or args.output_dir)
        try:
            chosen = [str(resume.check_resumable(latest)) if latest else None, None]
        except UserError as e:
            chosen = [None, str(e)]
    if distributed.is_initialized():
        torch.distributed.broadcast_object_list(chosen, src=0)
    if chosen[1]:
        raise UserError(chosen[1])
    return chosen[0]


def lm_eval_callback(args: TrainingArguments) -> LmEvalCallback:
    """--eval_tasks: the main process evaluates the whole model, which ZeRO-3 and FSDP never hold in one process."""
    if is_deepspeed_zero3_enabled() or args.fsdp:
        raise ConfigError("--eval_tasks runs on the main process's copy of the model: use DDP or ZeRO-1/2, or evaluate "
                          "the saved model with `instructune eval` (ZeRO-3 and FSDP split the model across processes)")
    return LmEvalCallback([t.strip() for t in args.eval_tasks.split(",") if t.strip()], args.eval_tasks_steps,
                          args.eval_tasks_num_fewshot, args.eval_tasks_limit, args.eval_tasks_include_path)


def check_method_fits_data(method: str, formats: dict[str, int], specs: list[DatasetSpec]) -> None:
    """DPO trains on preference pairs only; SFT on instruction and chat records only."""
    pairs = {f: n for f, n in formats.items() if f in PAIR_FORMATS}
    others = {f: n for f, n in formats.items() if f not in PAIR_FORMATS}
    where = ", ".join(spec.path for spec in specs)
    if method == "dpo" and others:
        raise DataError(f"{where}: --method dpo trains on preference pairs (prompt/chosen/rejected, or HH's chosen/"
                        f"rejected), and {sum(others.values())} records are not pairs ("
                        + ", ".join(f"{f} {n}" for f, n in others.items()) + ")")
    if method == "sft" and pairs:
        raise DataError(f"{where}: {sum(pairs.values())} records are preference pairs (chosen/rejected): train them "
                        "with --method dpo")


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    callbacks: list[TrainerCallback] | None = None,
) -> TrainOutcome:
    # 1. Where to resume from, if asked (or if this folder's run was preempted, or torchrun restarted it).
    training_args.resume_from_checkpoint = guard.resume_flag(training_args)
    checkpoint = resume_point(training_args)

    # 2. Data: every dataset read, validated, mixed (duplicates dropped), rendered and tokenised, with the pad and EOS
    # tokens that training needs: once, by one process per node, into the cache that later runs memory-map.
    specs = parse_datasets(data_args.datasets) if data_args.datasets else [DatasetSpec(data_args.data_path)]
    specs = [dataclasses.replace(spec, path=shipped(spec.path)) for spec in specs]
    model_path = models.resolve_model_path(model_args.model_name_or_path)
    models.check_context(model_path, training_args.model_max_length, training_args.cache_dir,
                         model_args.trust_remote_code)
    # The tokenizer keeps its own limit (saved with the model, read by serving): the training length is a setting of
    # this run, given to the encoder and kept in the run summary.
    tokenizer = models.load_tokenizer(model_path, cache_dir=training_args.cache_dir,
                                      trust_remote_code=model_args.trust_remote_code)
    num_new_tokens = models.add_missing_special_tokens(tokenizer, model_args.pad_token)
    encoding = Encoding(data_args.prompt_template, training_args.model_max_length, data_args.train_on_inputs,
                        data_args.overlong)
    prepared = prepare(specs, tokenizer, encoding, training_args.seed, data_args.strict_data, data_args.dedup,
                       cache_dir=data_args.tokenized_cache_dir, workers=data_args.preprocessing_num_workers,
                       wait=training_args.local_process_index != 0)  # waits on the folder, not in a collective
    examples, stats = prepared.examples(), prepared.stats
    check_method_fits_data(training_args.method, prepared.formats, specs)
    if not len(examples):
        raise DataError(f"{', '.join(s.path for s in specs)}: no record fits in model_max_length={training_args.model_max_length}")
    validation = None
    if data_args.val_set_size:
        train_part, heldout_part = hold_out(len(examples), data_args.val_set_size, training_args.seed)
        examples, validation = examples.select(train_part), examples.select(heldout_part)
        training_args.eval_on_start = True  # the held-out loss before training; the final one is measured below
        stats = dataclasses.replace(stats, heldout=len(validation))
    train_examples = examples
    dpo = training_args.method == "dpo"
    if training_args.precompute_ref_log_probs and not dpo:
        raise ConfigError("--precompute_ref_log_probs is for --method dpo (the reference's log-probs of each pair)")
    if dpo and training_args.beta <= 0:
        raise ConfigError(f"--beta {training_args.beta:g}: must be above 0 (the strength of the pull to the reference)")
    if dpo and (data_args.packing or data_args.padding_free):
        raise ConfigError("--method dpo pads each batch of pairs (the policy and the reference read the same batch); "
                          "train it without --packing and --padding_free")
    if data_args.packing:
        train_examples, fill = examples.packed(training_args.model_max_length)
        stats = dataclasses.replace(stats, packed_rows=len(train_examples), packed_fill=fill)
    training_args.remove_unused_columns = False  # the collator reads the cache's columns (ids and target spans)
    logger.info("data: %s", stats.summary())

    # 3. Model, once the output folder is known to be ours to write: all of it trains, or LoRA adapters on it
    # (QLoRA: on a 4-bit base).
    quantization = adapters.quantization_config(model_args, on_gpu=not on_cpu())
    if model_args.merge_adapter and not model_args.lora_r:
        raise ConfigError("--merge_adapter merges a LoRA adapter: train one with --lora_r R")
    deepspeed_config = training_args.deepspeed if isinstance(training_args.deepspeed, str) else None
    prepare_output_dir(training_args, {"base model": [model_path], "data": [spec.path for spec in specs],
                                       "config file": [training_args.config, deepspeed_config],
                                       "task folder": [training_args.eval_tasks_include_path]})
    distributed.init_deepspeed_comm(training_args)
    model = models.load_model(model_path, training_args.cache_dir, model_args.trust_remote_code,
                              quantization=quantization)
    if num_new_tokens:
        models.resize_embeddings(model, tokenizer, num_new_tokens)
    if model_args.lora_r:
        added = list(range(len(tokenizer) - num_new_tokens, len(tokenizer)))
        if added and is_deepspeed_zero3_enabled() and on_cpu():
            distributed.peft_trainable_tokens_on_cpu()
        model = adapters.add_lora(model, model_args, added, training_args.gradient_checkpointing, training_args.seed)
    # DPO's reference: with an adapter, the base (the adapter disabled); precomputed, none held; else a frozen copy.
    reference_cache = None
    if dpo and training_args.precompute_ref_log_probs:
        reference_cache = preference.reference_cache_path(prepared.folder, model_path, {
            "pad_token": model_args.pad_token, "lora": bool(model_args.lora_r), "quantization": repr(quantization),
            "bf16": training_args.bf16, "fp16": training_args.fp16, "max_length": training_args.model_max_length})
    reference = None
    if dpo and not model_args.lora_r and reference_cache is None:
        reference = models.load_model(model_path, training_args.cache_dir, model_args.trust_remote_code)
        if num_new_tokens:
            models.resize_embeddings(reference, tokenizer, num_new_tokens)

    if training_args.eval_tasks:
        callbacks = [*(callbacks or []), lm_eval_callback(training_args)]
    if training_args.skip_nonfinite_steps and training_args.deepspeed:
        raise ConfigError("--skip_nonfinite_steps: DeepSpeed takes its optimizer step inside the backward pass, before "
                          "a step could be skipped; without it a non-finite loss stops the run before anything is saved")
    step_guard = guard.StepGuard(guard.signals_of(training_args.save_on_signal), training_args.skip_nonfinite_steps,
                                 training_args.device)

    # 4. Train: padded, padding-free or packed batches; logits and loss at target positions only where the model
    # can (every HF causal LM of transformers 5: `logits_to_keep`); speed measured all along.
    target_logits = supports_target_logits(model)
    collator = Collator(tokenizer, flatten=data_args.padding_free or data_args.packing, target_logits_only=target_logits,
                        flash_attention="flash" in str(model.config._attn_implementation), pairs=dpo)
    # A 4-bit base computes in its own dtype; ZeRO-3 holds a partition of the weights until the engine runs them.
    if training_args.bf16 and on_cpu() and quantization is None and not is_deepspeed_zero3_enabled():
        precision.check_bf16_on_cpu(training_args, model, collator, train_examples)
    method = {}  # DPO: its loss in compute_loss, with the reference
    if dpo:
        method = {"preference": preference.Preference(training_args.beta, training_args.dpo_loss, reference_cache),
                  "reference": reference}
    trainer = (preference.PreferenceTrainer if dpo else InstructTrainer)(
        model=model,
        args=training_args,
        train_dataset=train_examples,
        eval_dataset=validation,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
        compute_loss_func=target_token_loss if target_logits and not dpo else None,
        speed=SpeedMeter(model, training_args.device, training_args.world_size, training_args.bf16),
        flat_batches=collator.flatten,
        guard=step_guard,
        **method,
    )
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        step_guard.restore()
    if step_guard.skipped:
        result.metrics["skipped_nonfinite_steps"] = step_guard.skipped
    if step_guard.stopped_at is not None:
        step = step_guard.stopped_at
        logger.warning("preempted at step %d: checkpoint-%d saved; rerun the same command to resume", step, step)
        return TrainOutcome(metrics=result.metrics, data=stats, losses=[], heldout_losses=[], preempted_at=step)
    trainer.speed.take_window()  # the steps since the last log
    speed = trainer.speed.summary()
    if "tokens_per_second" in speed:
        logger.info("speed: %.0f tokens/s (%.0f target tokens/s), %.1f%% padding, MFU %s", speed["tokens_per_second"],
                    speed["target_tokens_per_second"], 100 * speed["padding_fraction"],
                    f"{speed['mfu']:.1%}" if "mfu" in speed else "n/a")
    if validation:
        trainer.evaluate()

    # 5. Export: a Hugging Face folder (or an adapter folder, and with --merge_adapter the merged model) and the
    # run summary.
    save_model_folder(trainer, result.metrics, stats, speed, data_args.prompt_template)
    if model_args.merge_adapter and trainer.is_world_process_zero():
        merged = Path(training_args.output_dir) / MERGED
        adapters.merge(model_path, training_args.output_dir, merged, training_args.max_shard_size)
        logger.info("adapter merged into the base model: %s", merged)
    losses = [e["loss"] for e in loss_history(trainer)]
    heldout = [e["loss"] for e in loss_history(trainer, "eval_loss")]
    if heldout:
        logger.info("held-out loss %.4f → %.4f (%d examples)", heldout[0], heldout[-1], len(validation))
    return TrainOutcome(metrics=result.metrics, data=stats, losses=losses, heldout_losses=heldout)
