"""Tokenise records into training examples: prompt tokens masked, response followed by a learned EOS.

The prompt and the response are tokenised separately and concatenated, so the model is trained on
exactly the token sequence it sees at generation time (prompt ids, then its own continuation), and
the unmasked labels decode to `output + eos` with no boundary guesswork. Labels come from positions,
never from comparing ids with the pad id, so EOS stays a target even when pad == eos.
"""

from dataclasses import dataclass, field

from instructune.data.records import Record, skipped_summary
from instructune.data.templates import render_prompt, template_adds_special_tokens
from instructune.errors import DataError

IGNORE_INDEX = -100  # the label value that PyTorch's cross-entropy (and the HF models) skip


@dataclass
class DataStats:
    records: int  # usable records
    kept: int  # examples made of them
    truncated: int
    dropped: int
    longest: int  # tokens in the longest example before truncation
    skipped: dict[str, int] = field(default_factory=dict)  # records skipped for an empty field, per field
    heldout: int = 0  # examples held out for validation

    def summary(self) -> str:
        text = (f"{self.records} records → {self.kept} examples ({self.truncated} truncated, "
                f"{self.dropped} dropped; longest {self.longest} tokens)")
        if self.heldout:
            text += f", {self.heldout} held out for validation"
        return text + (f"; {skipped_summary(self.skipped)}" if self.skipped else "")


def encode_records(
    records: list[Record],
    tokenizer,
    template: str,
    max_length: int,
    train_on_inputs: bool = False,
    overlong: str = "truncate",
) -> tuple[list[dict], DataStats]:
    """Examples with input_ids, attention_mask and labels; records too long are truncated or dropped."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; the model could never learn to stop")
    prompts = [render_prompt(template, r.instruction, r.input, tokenizer) for r in records]
    # verbose=False: no "longer than the maximum" warning; over-long examples are handled and counted below
    prompt_ids = tokenizer(prompts, add_special_tokens=template_adds_special_tokens(template), verbose=False)["input_ids"]
    response_ids = tokenizer([r.output for r in records], add_special_tokens=False, verbose=False)["input_ids"]

    examples, truncated, dropped, longest = [], 0, 0, 0
    for prompt, response in zip(prompt_ids, response_ids):
        target = response + [tokenizer.eos_token_id]
        input_ids = prompt + target
        labels = input_ids if train_on_inputs else [IGNORE_INDEX] * len(prompt) + target
        longest = max(longest, len(input_ids))
        if len(input_ids) > max_length:
            if overlong == "drop" or len(prompt) >= max_length:  # nothing of the response would be left
                dropped += 1
                continue
            input_ids, labels = input_ids[:max_length], labels[:max_length]
            truncated += 1
        examples.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": list(labels)})
    return examples, DataStats(len(records), len(examples), truncated, dropped, longest)


def hold_out(examples: list[dict], size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, validation): `size` examples (a fraction of them if below 1) drawn with `seed`."""
    import random

    count = round(size * len(examples)) if 0 < size < 1 else int(size)
    if count >= len(examples):
        raise DataError(f"--val_set_size {size:g} leaves nothing to train on ({len(examples)} examples)")
    chosen = set(random.Random(seed).sample(range(len(examples)), count))
    train = [e for i, e in enumerate(examples) if i not in chosen]
    return train, [e for i, e in enumerate(examples) if i in chosen]
