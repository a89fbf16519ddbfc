"""The training story, top to bottom: config → data → model → Trainer → export.

Everything that can fail on the user's input (data, tokenizer) runs before the model is loaded and
before anything is written, so a bad record costs seconds and leaves no half-made output folder.
"""

import logging
from dataclasses import dataclass

from transformers import DataCollatorForSeq2Seq, TrainerCallback

from instructune import models
from instructune.checkpoint import resume
from instructune.config import DataArguments, ModelArguments, TrainingArguments
from instructune.data import IGNORE_INDEX, EncodeStats, encode_records, load_records
from instructune.errors import DataError
from instructune.export import loss_history, save_model_folder
from instructune.trainer import InstructTrainer

logger = logging.getLogger("instructune")


@dataclass
class TrainOutcome:
    metrics: dict
    data: EncodeStats
    losses: list[float]


def resume_point(args: TrainingArguments) -> str | None:
    """--resume_from_checkpoint PATH as given; 'auto': the newest complete checkpoint in output_dir, if any."""
    if args.resume_from_checkpoint != "auto":
        return args.resume_from_checkpoint
    latest = resume.latest_complete(args.output_dir)
    logger.info("resuming from %s" if latest else "no complete checkpoint in %s: starting from the beginning",
                latest or args.output_dir)
    return str(latest) if latest else None


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    callbacks: list[TrainerCallback] | None = None,
) -> TrainOutcome:
    # 1. Data: read and validate every record.
    records = load_records(data_args.data_path)

    # 2. Tokenizer, with the pad and EOS tokens that training needs; then the examples.
    model_path = models.resolve_model_path(model_args.model_name_or_path)
    tokenizer = models.load_tokenizer(
        model_path, training_args.model_max_length, training_args.cache_dir, model_args.trust_remote_code
    )
    num_new_tokens = models.add_missing_special_tokens(tokenizer, model_args.pad_token)
    if data_args.prompt_template == "chat" and not tokenizer.chat_template:
        raise DataError(f"{model_args.model_name_or_path}: the tokenizer has no chat template; use --prompt_template alpaca")
    examples, stats = encode_records(
        records,
        tokenizer,
        data_args.prompt_template,
        training_args.model_max_length,
        data_args.train_on_inputs,
        data_args.overlong,
    )
    logger.info("data: %s", stats.summary())
    if not examples:
        raise DataError(f"{data_args.data_path}: no record fits in model_max_length={training_args.model_max_length}")

    # 3. Model.
    model = models.load_model(model_path, training_args.cache_dir, model_args.trust_remote_code)
    if num_new_tokens:
        models.resize_embeddings(model, tokenizer, num_new_tokens)

    # 4. Train.
    trainer = InstructTrainer(
        model=model,
        args=training_args,
        train_dataset=examples,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=resume_point(training_args))

    # 5. Export: a Hugging Face folder and the run summary.
    save_model_folder(trainer, result.metrics, stats)
    losses = [e["loss"] for e in loss_history(trainer)]
    return TrainOutcome(metrics=result.metrics, data=stats, losses=losses)
