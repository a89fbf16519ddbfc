"""Tokenise conversations into training examples: every assistant turn is a target, everything else masked.

Each segment of the rendered conversation is tokenised on its own and the pieces concatenated, so the
model is trained on exactly the token sequence it sees at generation time (prompt ids, then its own
continuation), and the unmasked labels decode to the assistant turns with no boundary guesswork.
Labels come from positions, never from comparing ids with the pad id, so EOS stays a target even
when pad == eos. For Alpaca's template the tokenizer's EOS is appended to the response, as Alpaca did.
"""

import random
from dataclasses import dataclass, field

from instructune.data.formats import Conversation
from instructune.data.sources import skipped_summary
from instructune.data.templates import render_segments, template_adds_special_tokens, template_for
from instructune.errors import DataError

IGNORE_INDEX = -100  # the label value that PyTorch's cross-entropy (and the HF models) skip


@dataclass
class DataStats:
    records: int  # usable conversations
    kept: int  # examples made of them
    truncated: int
    dropped: int
    longest: int  # tokens in the longest example before truncation
    skipped: dict[str, int] = field(default_factory=dict)  # records skipped for an empty field, per field
    duplicates: dict[str, int] = field(default_factory=dict)  # removed: exact, normalised
    sources: dict[str, int] = field(default_factory=dict)  # conversations taken from each dataset
    heldout: int = 0  # examples held out for validation
    packed_rows: int = 0  # with --packing: rows the training examples were packed into
    packed_fill: float = 0.0  # real tokens / (rows × model_max_length)

    def summary(self) -> str:
        text = (f"{self.records} records → {self.kept} examples ({self.truncated} truncated, "
                f"{self.dropped} dropped; longest {self.longest} tokens)")
        if self.heldout:
            text += f", {self.heldout} held out for validation"
        if self.packed_rows:
            text += f"; packed into {self.packed_rows} rows ({self.packed_fill:.1%} full)"
        if len(self.sources) > 1:
            text += "; from " + ", ".join(f"{name} {count}" for name, count in self.sources.items())
        if any(self.duplicates.values()):
            text += f"; duplicates removed: {self.duplicates.get('exact', 0)} exact, {self.duplicates.get('normalised', 0)} normalised"
        return text + (f"; {skipped_summary(self.skipped)}" if self.skipped else "")


KEPT, TRUNCATED, DROPPED = 0, 1, 2  # what became of a conversation (the `outcome` column)


def encode_conversations(conversations: list[Conversation], tokenizer, template: str, max_length: int,
                         **options) -> tuple[list[dict], DataStats]:
    """Examples with input_ids, attention_mask and labels; examples too long are truncated or dropped.
    `options`: train_on_inputs, overlong, as for encode_columns."""
    return examples_and_stats(encode_columns(conversations, tokenizer, template, max_length, **options))


def examples_and_stats(columns: dict[str, list]) -> tuple[list[dict], DataStats]:
    """The kept examples of encode_columns' output, and what became of the rest."""
    outcomes = columns["outcome"]
    examples = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
                for ids, labels, outcome in zip(columns["input_ids"], columns["labels"], outcomes) if outcome != DROPPED]
    stats = DataStats(len(outcomes), len(examples), outcomes.count(TRUNCATED), outcomes.count(DROPPED),
                      max(columns["length"], default=0))
    return examples, stats


def encode_columns(
    conversations: list[Conversation],
    tokenizer,
    template: str,
    max_length: int,
    train_on_inputs: bool = False,
    overlong: str = "truncate",
) -> dict[str, list]:
    """One row per conversation: input_ids and labels (empty if dropped), its length before truncation and
    its outcome (KEPT, TRUNCATED or DROPPED); the shape of a batched `datasets` map (see cache.py)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; the model could never learn to stop")
    if not tokenizer.chat_template:
        if needing := next((c for c in conversations if template_for(c, template) == "chat"), None):
            reason = "a multi-turn conversation" if needing.multi_turn else "--prompt_template chat"
            raise DataError(f"{needing.source}: {reason} is rendered with the tokenizer's chat template, and "
                            f"{tokenizer.name_or_path} has none")
    rendered = [(template_for(c, template), render_segments(c, template, tokenizer)) for c in conversations]
    # One batched call per kind of segment: the first segment of an Alpaca-template example gets the
    # tokenizer's BOS, like Alpaca's prompts; chat templates write their own special tokens.
    first = [(t, i == 0) for t, segments in rendered for i in range(len(segments))]
    texts = [text for _, segments in rendered for text, _ in segments]
    with_specials = [template_adds_special_tokens(t) and is_first for t, is_first in first]
    ids = [None] * len(texts)
    for flag in (True, False):
        chosen = [i for i, f in enumerate(with_specials) if f == flag]
        # verbose=False: no "longer than the maximum" warning; over-long examples are handled and counted below
        encoded = tokenizer([texts[i] for i in chosen], add_special_tokens=flag, verbose=False)["input_ids"] if chosen else []
        for i, tokens in zip(chosen, encoded):
            ids[i] = tokens

    columns = {"input_ids": [], "labels": [], "length": [], "outcome": []}
    position = 0
    for chosen_template, segments in rendered:
        input_ids, labels = [], []
        for text, is_target in segments:
            tokens = ids[position]
            position += 1
            input_ids += tokens
            labels += tokens if is_target or train_on_inputs else [IGNORE_INDEX] * len(tokens)
        if chosen_template == "alpaca":
            input_ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
        columns["length"].append(len(input_ids))
        outcome = KEPT
        if len(input_ids) > max_length:
            first_target = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
            if overlong == "drop" or first_target >= max_length:  # nothing of the response would be left
                outcome, input_ids, labels = DROPPED, [], []
            else:
                outcome, input_ids, labels = TRUNCATED, input_ids[:max_length], labels[:max_length]
        columns["input_ids"].append(input_ids)
        columns["labels"].append(labels)
        columns["outcome"].append(outcome)
    return columns


def hold_out(examples: list[dict], size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, validation): `size` examples (a fraction of them if below 1) drawn with `seed`."""
    count = round(size * len(examples)) if 0 < size < 1 else int(size)
    if count >= len(examples):
        raise DataError(f"--val_set_size {size:g} leaves nothing to train on ({len(examples)} examples)")
    chosen = set(random.Random(seed).sample(range(len(examples)), count))
    train = [e for i, e in enumerate(examples) if i not in chosen]
    return train, [e for i, e in enumerate(examples) if i in chosen]
