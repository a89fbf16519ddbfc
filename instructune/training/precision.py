"""bf16 on the CPU, checked: before the first step, the first batch's loss in bf16 autocast against fp32's.

CPUs with AMX or AVX-512-BF16 train faster in bf16 (1.3x here, bench/throughput.py --bf16) with the same loss; a model
whose loss bf16 changes (a layer that overflows, a norm computed in low precision) must not be trained in it
silently. The check costs two forwards of one batch.
"""

import logging

import torch

from instructune.errors import ConfigError
from instructune.training.trainer import on_device

logger = logging.getLogger("instructune")

TOLERANCE = 0.02  # relative difference of the two losses; bf16's 8-bit mantissa moves a loss by well under 1 %


def first_batch_losses(model, batch: dict) -> tuple[float, float]:
    """(fp32 loss, bf16-autocast loss) of one batch, dropout off, no gradient."""
    batch = {k: v for k, v in batch.items() if k != "logits_to_keep"}  # the model's own loss needs every position
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            fp32 = model(**batch).loss.item()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16 = model(**batch).loss.item()
    finally:
        model.train(was_training)
    return fp32, bf16


def check_bf16_on_cpu(args, model, collator, examples) -> None:
    """With --bf16 on the CPU: train in bf16 if the first batch's loss matches fp32's, else in fp32 (with DeepSpeed,
    whose config is already set for bf16, stop instead). Says which, with both losses."""
    batch = collator([examples[i] for i in range(min(args.per_device_train_batch_size, len(examples)))])
    fp32, bf16 = first_batch_losses(model, on_device(batch, args.device))
    difference = abs(bf16 - fp32) / max(abs(fp32), 1e-6)
    if difference <= TOLERANCE:
        logger.info("bf16 on the CPU: first batch's loss %.4f in bf16, %.4f in fp32 (%.2f%% apart): training in bf16",
                    bf16, fp32, 100 * difference)
        return
    if args.deepspeed:
        raise ConfigError(f"--bf16 changes this model's loss on the CPU by {difference:.1%} (first batch: {bf16:.4f} in "
                          f"bf16, {fp32:.4f} in fp32): train without --bf16")
    logger.warning("bf16 on the CPU: first batch's loss %.4f in bf16, %.4f in fp32 (%.1f%% apart, over %.0f%%): "
                   "training in fp32", bf16, fp32, 100 * difference, 100 * TOLERANCE)
    args.bf16, args.mixed_precision = False, "no"
