"""Batches: padded (Alpaca's), padding-free, or packed; and which positions need logits at all.

- padded: each step's examples padded to the longest of them, with a 2-D attention mask.
- padding-free (`--padding_free`): the same examples flattened into one row, `position_ids`
  restarting at each example and no attention mask, so attention stays within each example
  (transformers builds the block-diagonal causal mask from the position ids for sdpa and eager;
  flash attention reads the same boundaries from them). The first label of every example is
  masked: nothing before it belongs to its example.
- packed (`--packing`): examples binned best-fit-decreasing into rows of up to model_max_length
  tokens (never split). The rows of a step stay rows ([rows, longest row]), each flattened the same way with
  its positions restarting at each example, and padded at its end with tokens at position 0, each a block of
  one that attends only to itself and is no label (an example has at least 2 tokens, so the speed meter tells
  them apart): attention costs rows × length², not (rows × length)² as one flattened row of them would. With
  flash attention, whose varlen kernel costs only Σn² anyway, the rows are flattened.

A 2-D attention mask, even all ones, would switch transformers' packed detection off and let sdpa
attend across examples, so flattened batches never carry one; nor do they let the model build a
cache (`use_cache`), which does the same. The trainer checks this on the real model before the first
step (training/trainer.py: mask_needed_to_keep_examples_apart).

Every batch can also say which positions' logits the loss needs (`logits_to_keep`: the positions
whose next token is a target), so the LM head runs only there: for Alpaca data about half the real
tokens are prompt, and the LM head is a fifth of a small model's FLOPs.
"""

import bisect
import heapq
from dataclasses import dataclass

import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

from instructune.data.encode import IGNORE_INDEX, example


@dataclass
class Collator:
    tokenizer: object
    flatten: bool = False  # padding-free / packed: one row, position ids, no attention mask
    target_logits_only: bool = False  # add logits_to_keep (the model must accept it)
    flash_attention: bool = False  # flattened: also the boundaries as flash attention's varlen kwargs (cu_seq_lens)
    pairs: bool = False  # preference pairs: every chosen conversation, then every rejected one, padded together

    def __post_init__(self):
        self.padded = DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=IGNORE_INDEX)
        self.flat = DataCollatorWithFlattening(separator_id=IGNORE_INDEX, return_flash_attn_kwargs=self.flash_attention)

    def __call__(self, items: list) -> dict:
        # An item is one example or a packed row (a list of them); an example is a cache row (ids and target spans)
        # or already has its labels.
        if self.pairs:
            batch = self.padded([example(e) for e in items] + [example(e, rejected=True) for e in items])
            if "reference_log_probs" in items[0]:  # precomputed: in the batch's order, chosen ones then rejected
                batch["reference_log_probs"] = torch.tensor([e["reference_log_probs"] for e in items]).T.reshape(-1)
        elif self.flatten and not self.flash_attention and any(isinstance(item, list) for item in items):
            batch = self._rows([item if isinstance(item, list) else [item] for item in items])
        elif self.flatten:
            batch = self._flattened([e for item in items for e in (item if isinstance(item, list) else [item])])
        else:
            batch = self.padded([_labelled(e) for e in items])
        if self.target_logits_only:
            batch["logits_to_keep"] = next_token_is_target(batch["labels"])
        return batch

    def _flattened(self, examples: list[dict]) -> dict:
        batch = self.flat([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in map(_labelled, examples)])
        batch["use_cache"] = False
        return batch

    def _rows(self, rows: list[list[dict]]) -> dict:
        """Each packed row flattened on its own, then all padded to the longest: the padding (position 0 each: blocks
        of one) is no label and no context of any example."""
        flattened = [self._flattened(row) for row in rows]
        width = max(f["input_ids"].shape[1] for f in flattened)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

        def stacked(name: str, fill) -> torch.Tensor:
            return torch.cat([torch.cat([f[name], fill(width - f[name].shape[1]).view(1, -1)], dim=1) for f in flattened])

        return {"input_ids": stacked("input_ids", lambda n: torch.full((n,), pad)),
                "labels": stacked("labels", lambda n: torch.full((n,), IGNORE_INDEX)),
                "position_ids": stacked("position_ids", lambda n: torch.zeros(n, dtype=torch.long)), "use_cache": False}


def _labelled(item: dict) -> dict:
    return item if "labels" in item else example(item)


def next_token_is_target(labels: torch.Tensor) -> torch.Tensor:
    """Boolean [batch, length]: True where the next position's label is a target (a model's logits at
    position i predict label i+1)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def pack_best_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
    """Indices of examples grouped into rows of at most `capacity` tokens, longest first, each into the fullest row
    it still fits (best fit decreasing; ties to the earliest row); an example longer than `capacity` gets a row of
    its own. O(n log n): rows are kept by their free room (at most `capacity` distinct values), so finding the best
    fit is one bisection; a million examples pack in seconds."""
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable").tolist()  # longest first, ties in index order
    lengths = lengths.tolist()
    rows: list[list[int]] = []
    rooms: list[int] = []  # the distinct free rooms that some row has, sorted
    rows_with_room: dict[int, list[int]] = {}  # free room → a heap of the row numbers that have it
    for index in order:
        length = lengths[index]
        slot = bisect.bisect_left(rooms, length)
        if slot < len(rooms):
            room = rooms[slot]
            waiting = rows_with_room[room]
            row = heapq.heappop(waiting)
            if not waiting:
                del rows_with_room[room]
                rooms.pop(slot)
            rows[row].append(index)
            left = room - length
        else:
            row, left = len(rows), capacity - length
            rows.append([index])
        if left > 0:
            if left not in rows_with_room:
                rows_with_room[left] = []
                bisect.insort(rooms, left)
            heapq.heappush(rows_with_room[left], row)
    return rows


def pack(lengths, capacity: int) -> tuple[list[list[int]], float]:
    """(rows of example indices, fill: real tokens / (rows × capacity))."""
    rows = pack_best_fit_decreasing(lengths, capacity)
    return rows, (float(sum(lengths)) / (len(rows) * capacity) if rows else 0.0)


class CachedExamples(torch.utils.data.Dataset):
    """Training examples read from the cache's memory-mapped rows when asked (nothing held in Python): `indices`
    are the rows taken, in order; with `groups`, each item is a packed row, a list of examples."""

    def __init__(self, rows, indices, groups: list[list[int]] | None = None):
        import numpy as np

        self.rows, self.indices, self.groups = rows, np.asarray(indices, dtype=np.int64), groups
        self.reference = None  # preference pairs: the reference's log-probs of each row's chosen and rejected, if precomputed

    def __len__(self) -> int:
        return len(self.groups) if self.groups is not None else len(self.indices)

    def __getitem__(self, index: int) -> dict | list[dict]:
        if self.groups is not None:
            return self.read(self.indices[self.groups[index]])
        return self.read(self.indices[[index]])[0]

    def __getitems__(self, keys: list[int]) -> list:  # a batch at once (the DataLoader's fast path)
        if self.groups is not None:
            return [self[key] for key in keys]
        return self.read(self.indices[keys])

    def read(self, indices) -> list[dict]:
        """The rows at these indices of the cache (not of this selection)."""
        columns = self.rows[indices.tolist()]
        items = [dict(zip(columns, values)) for values in zip(*columns.values())]
        if self.reference is not None:
            for item, values in zip(items, self.reference[indices].tolist()):
                item["reference_log_probs"] = values
        return items

    def lengths(self):
        """Tokens per example, from the length column (no pass over the examples); a pair's longer side."""
        import numpy as np

        columns, lengths = self.rows.data, self.rows.data.column("length").to_numpy()
        if "rejected_length" in columns.column_names:
            lengths = np.maximum(lengths, columns.column("rejected_length").to_numpy())
        return lengths[self.indices]

    def select(self, positions) -> "CachedExamples":
        return CachedExamples(self.rows, self.indices[positions])

    def packed(self, capacity: int) -> tuple["CachedExamples", float]:
        """These examples binned into rows of up to `capacity` tokens (best fit decreasing), and the rows' fill."""
        groups, fill = pack(self.lengths(), capacity)
        return CachedExamples(self.rows, self.indices, groups), fill
