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
    `options`: train_on_inputs, overlong, as for encode_columns. In memory: for small data and tests; training
    reads the same rows from the cache (cache.py)."""
    pairs = any(c.rejected is not None for c in conversations)
    columns = encode_columns(conversations, tokenizer, template, max_length, pairs=pairs, **options)
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    examples = [example(row) for row in rows if row["outcome"] != DROPPED]
    return examples, stats_of(columns["outcome"], columns["full_length"])


def stats_of(outcomes, full_lengths) -> DataStats:
    """What became of the conversations, from the outcome and full_length columns (lists or arrays)."""
    outcomes = list(outcomes)
    dropped = outcomes.count(DROPPED)
    return DataStats(len(outcomes), len(outcomes) - dropped, outcomes.count(TRUNCATED), dropped,
                     int(max(full_lengths, default=0)))


def example(row: dict, rejected: bool = False) -> dict:
    """A cache row (input_ids and target_spans) → the example the collator pads or flattens: labels are the ids
    inside the spans, IGNORE_INDEX elsewhere. `rejected`: a pair's rejected side (rejected_ids, rejected_spans)."""
    ids = row["rejected_ids" if rejected else "input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    spans = row["rejected_spans" if rejected else "target_spans"]
    for start, end in zip(spans[::2], spans[1::2]):
        labels[start:end] = ids[start:end]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def encode_columns(
    conversations: list[Conversation],
    tokenizer,
    template: str,
    max_length: int,
    train_on_inputs: bool = False,
    overlong: str = "truncate",
    pairs: bool = False,
) -> dict[str, list]:
    """One row per conversation: input_ids and labels (empty if dropped), its length before truncation and
    its outcome (KEPT, TRUNCATED or DROPPED); the shape of a batched `datasets` map (see cache.py).

    `pairs` (data with preference pairs): each row also holds its rejected conversation's ids, spans and length
    (PAIR_COLUMNS; empty for an instruction record); a pair's outcome is the worse of its two sides' (both are
    kept, or neither). Without it the columns are an instruction dataset's alone, as caches always had them."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; the model could never learn to stop")
    if not tokenizer.chat_template:
        if needing := next((c for c in conversations if template_for(c, template) == "chat"), None):
            reason = "a multi-turn conversation" if needing.multi_turn else "--prompt_template chat"
            raise DataError(f"{needing.source}: {reason} is rendered with the tokenizer's chat template, and "
                            f"{tokenizer.name_or_path} has none")
    paired = [i for i, c in enumerate(conversations) if c.rejected is not None]
    if paired and not pairs:
        raise ValueError(f"{conversations[paired[0]].source}: a preference pair, encoded without pairs=True")
    encoded = _encode(conversations + [conversations[i].with_rejected_reply() for i in paired], tokenizer, template,
                      max_length, train_on_inputs, overlong)
    rejected = dict(zip(paired, encoded[len(conversations):]))
    names = COLUMNS + PAIR_COLUMNS if pairs else COLUMNS
    columns = {name: [] for name in names}
    for i, (input_ids, spans, full_length, targets, outcome) in enumerate(encoded[:len(conversations)]):
        other_ids, other_spans = [], []
        if i in rejected:
            other_ids, other_spans, _, _, other_outcome = rejected[i]
            outcome = max(outcome, other_outcome)
            if outcome == DROPPED:
                input_ids, spans, other_ids, other_spans = [], [], [], []
        for name, value in zip(names, (input_ids, spans, len(input_ids), full_length, targets, outcome, other_ids,
                                       other_spans, len(other_ids))):
            columns[name].append(value)
    return columns


def _encode(conversations: list[Conversation], tokenizer, template: str, max_length: int, train_on_inputs: bool,
            overlong: str) -> list[tuple]:
    """(input_ids, target spans, full length, target tokens, outcome) of each conversation."""
    rendered = list(zip((template_for(c, template) for c in conversations),
                        render_segments(conversations, template, tokenizer)))
    # One batched call per kind of segment: the first segment of an Alpaca-template example gets the
    # tokenizer's BOS, like Alpaca's prompts; chat templates write their own special tokens.
    first = [(t, i == 0) for t, segments in rendered for i in range(len(segments))]
    texts = [text for _, segments in rendered for text, _ in segments]
    with_specials = [template_adds_special_tokens(t) and is_first for t, is_first in first]
    ids = [None] * len(texts)
    for flag in (True, False):
        chosen = [i for i, f in enumerate(with_specials) if f == flag]
        for i, tokens in zip(chosen, token_ids(tokenizer, [texts[i] for i in chosen], flag)):
            ids[i] = tokens

    encoded = []
    position = 0
    eos = tokenizer.eos_token_id  # a lookup in the vocabulary each time it is read
    for chosen_template, segments in rendered:
        input_ids, spans = [], []  # spans: [start, end) of each run of targets, flattened
        for text, is_target in segments:
            tokens = ids[position]
            position += 1
            if tokens and (is_target or train_on_inputs):
                if spans and spans[-1] == len(input_ids):
                    spans[-1] += len(tokens)
                else:
                    spans += [len(input_ids), len(input_ids) + len(tokens)]
            input_ids += tokens
        if chosen_template == "alpaca":  # EOS ends the response and is learned with it
            input_ids.append(eos)
            end = len(input_ids)
            spans = spans[:-1] + [end] if spans and spans[-1] == end - 1 else spans + [end - 1, end]
        full_length, targets, outcome = len(input_ids), sum(spans[1::2]) - sum(spans[::2]), KEPT
        if full_length > max_length:
            if overlong == "drop" or not spans or spans[0] >= max_length:  # nothing of the response would be left
                outcome, input_ids, spans = DROPPED, [], []
            else:
                outcome, input_ids = TRUNCATED, input_ids[:max_length]
                spans = _non_empty([min(p, max_length) for p in spans])
        encoded.append((input_ids, spans, full_length, targets, outcome))
    return encoded


def token_ids(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """The ids of each text, as `tokenizer(texts)["input_ids"]` gives them.

    A fast tokenizer's Rust backend is called directly (encode_batch_fast: no offsets) when its state is the one
    a plain call sets (no truncation, no padding, special tokens split as the tokenizer says): the transformers
    wrapper builds a dict per text (attention mask, overflow, length checks) that costs about as much as the
    tokenising itself, and it was the largest cost of preparing a large mix (bench/data_scale.py)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if texts and backend is not None and hasattr(backend, "encode_batch_fast") and backend.truncation is None \
            and backend.padding is None and backend.encode_special_tokens == bool(tokenizer.split_special_tokens):
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]
    # verbose=False: no "longer than the maximum" warning; over-long examples are handled and counted by the caller
    return tokenizer(texts, add_special_tokens=add_special_tokens, verbose=False)["input_ids"] if texts else []


# The columns of a tokenised conversation (one row each): its ids; its targets as [start, end) pairs (no second id
# column); its length, and its length and target count before truncation (for `data inspect`); its outcome. Data with
# preference pairs also has, per row, the rejected conversation's ids, target spans and length.
COLUMNS = ("input_ids", "target_spans", "length", "full_length", "target_tokens", "outcome")
PAIR_COLUMNS = ("rejected_ids", "rejected_spans", "rejected_length")


def _non_empty(spans: list[int]) -> list[int]:
    return [p for start, end in zip(spans[::2], spans[1::2]) if end > start for p in (start, end)]


def hold_out(count: int, size: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) indices of `count` examples: `size` of them (a fraction if below 1) drawn with `seed`
    for validation, both in their original order."""
    wanted = round(size * count) if 0 < size < 1 else int(size)
    if wanted >= count:
        raise DataError(f"--val_set_size {size:g} leaves nothing to train on ({count} examples)")
    chosen = set(random.Random(seed).sample(range(count), wanted))
    return [i for i in range(count) if i not in chosen], sorted(chosen)
