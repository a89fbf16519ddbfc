"""Batches: padded (Alpaca's), padding-free, or packed; and which positions need logits at all.

- padded: each step's examples padded to the longest of them, with a 2-D attention mask.
- padding-free (`--padding_free`): the same examples flattened into one row, `position_ids`
  restarting at each example and no attention mask, so attention stays within each example
  (transformers builds the block-diagonal causal mask from the position ids for sdpa and eager;
  flash attention reads the same boundaries from them). The first label of every example is
  masked: nothing before it belongs to its example.
- packed (`--packing`): examples binned best-fit-decreasing into rows of up to model_max_length
  tokens (never split); a batch of rows is flattened the same way, so a step has fewer pads and more examples.

A 2-D attention mask, even all ones, would switch transformers' packed detection off and let sdpa
attend across examples, so flattened batches never carry one; nor do they let the model build a
cache (`use_cache`), which does the same. The trainer checks this on the real model before the first
step (training/trainer.py: mask_needed_to_keep_examples_apart).

Every batch can also say which positions' logits the loss needs (`logits_to_keep`: the positions
whose next token is a target), so the LM head runs only there: for Alpaca data about half the real
tokens are prompt, and the LM head is a fifth of a small model's FLOPs.
"""

import bisect
from dataclasses import dataclass

import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

from instructune.data.encode import IGNORE_INDEX


@dataclass
class Collator:
    tokenizer: object
    flatten: bool = False  # padding-free / packed: one row, position ids, no attention mask
    target_logits_only: bool = False  # add logits_to_keep (the model must accept it)
    flash_attention: bool = False  # flattened: also the boundaries as flash attention's varlen kwargs (cu_seq_lens)

    def __post_init__(self):
        self.padded = DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=IGNORE_INDEX)
        self.flat = DataCollatorWithFlattening(separator_id=IGNORE_INDEX, return_flash_attn_kwargs=self.flash_attention)

    def __call__(self, items: list) -> dict:
        # An item is one example (a dict) or a packed row (a list of examples).
        examples = [e for item in items for e in (item if isinstance(item, list) else [item])]
        if self.flatten:
            batch = self.flat([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
            batch["use_cache"] = False
        else:
            batch = self.padded(examples)
        if self.target_logits_only:
            batch["logits_to_keep"] = next_token_is_target(batch["labels"])
        return batch


def next_token_is_target(labels: torch.Tensor) -> torch.Tensor:
    """Boolean [batch, length]: True where the next position's label is a target (a model's logits at
    position i predict label i+1)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def pack_best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of examples grouped into rows of at most `capacity` tokens, longest first, each into the
    fullest row it still fits (best fit decreasing); an example longer than `capacity` gets a row of its own."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row number), sorted: the best fit is the first that fits
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            room, row = free.pop(slot)
            rows[row].append(index)
            bisect.insort(free, (room - length, row))
        else:
            rows.append([index])
            if capacity > length:
                bisect.insort(free, (capacity - length, len(rows) - 1))
    return rows


def pack(examples: list[dict], capacity: int) -> tuple[list[list[dict]], float]:
    """(rows of examples, fill: real tokens / (rows × capacity))."""
    lengths = [len(e["input_ids"]) for e in examples]
    rows = pack_best_fit_decreasing(lengths, capacity)
    fill = sum(lengths) / (len(rows) * capacity) if rows else 0.0
    return [[examples[i] for i in row] for row in rows], fill
