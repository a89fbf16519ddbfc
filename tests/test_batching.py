"""Padding-free and packed batches are exact: the same weights as padded batches (SGD, fp32), per-example
logits of a packed row equal those of the examples run alone, no example sees another, and the loss is
the mean over the targets of the whole optimizer step."""

import json
import random
import types

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from instructune.cli import main
from instructune.data import IGNORE_INDEX, encode_conversations, load_conversations
from instructune.data.batching import Collator, next_token_is_target, pack, pack_best_fit_decreasing
from instructune.errors import UserError
from instructune.modeling import models
from instructune.training.trainer import causal_mask_from_positions, mask_needed_to_keep_examples_apart, target_token_loss

from conftest import SAMPLE_DATA
from test_train import tiny_run_flags


def tokenizer_and_examples(model_path, count=24, max_length=256):
    tokenizer = models.load_tokenizer(str(model_path))
    models.add_missing_special_tokens(tokenizer, "[PAD]")
    examples, _ = encode_conversations(load_conversations(str(SAMPLE_DATA))[:count], tokenizer, "alpaca", max_length)
    return tokenizer, examples


def load(model_path, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return model.eval()


def train_weights(model_path, output_dir, *flags) -> dict:
    flags = tiny_run_flags(model_path, output_dir, steps=6, learning_rate=0.5) + ["--optim", "sgd", *flags]
    assert main(["train", *flags]) == 0
    return {k: v for shard in sorted(output_dir.glob("model-*.safetensors")) for k, v in load_file(shard).items()}


def without_dropout(model_path, folder):
    """A copy of the model with dropout off (OPT has 0.1): dropout masks depend on the batch's shape."""
    import shutil

    shutil.copytree(model_path, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update({k: 0.0 for k in ("dropout", "attention_dropout", "activation_dropout") if k in config})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.slow  # trains (the fast tier trains nothing)
@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_opt"])
def test_padding_free_trains_to_the_padded_weights(model_fixture, request, tmp_path):
    """Same examples per step: padded batches of 8, padding-free batches of 8, and padding-free micro-batches of 4
    accumulated twice (the loss is the mean over the step's targets, not a mean of micro-batch means)."""
    model = without_dropout(request.getfixturevalue(model_fixture), tmp_path / "model")
    padded = train_weights(model, tmp_path / "padded")
    flat = train_weights(model, tmp_path / "flat", "--padding_free", "True")
    accumulated = train_weights(model, tmp_path / "accumulated", "--padding_free", "True",
                                "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2")
    base = load_file(next(model.glob("*.safetensors")))
    moved = max((padded[k][: len(base[k])] - base[k]).abs().max().item() for k in base)
    assert moved > 1e-2  # training really changed the weights...
    for other in (flat, accumulated):
        assert padded.keys() == other.keys()
        assert max((padded[k] - other[k]).abs().max().item() for k in padded) < 1e-6  # ...and identically


@pytest.mark.slow  # trains (the fast tier trains nothing)
def test_padding_free_adamw_stays_close_to_padded(tiny_llama, tmp_path):
    """AdamW divides by the root of tiny second moments, so fp32 round-off in near-zero gradients grows to
    lr-sized steps: close, relative to how far training moved the weights, not equal."""
    runs = {}
    for name, extra in (("padded", []), ("flat", ["--padding_free", "True"])):
        flags = tiny_run_flags(tiny_llama, tmp_path / name, steps=6, learning_rate=1e-3) + extra
        assert main(["train", *flags]) == 0
        runs[name] = {k: v for s in sorted((tmp_path / name).glob("model-*.safetensors")) for k, v in load_file(s).items()}
    base = load_file(next(tiny_llama.glob("*.safetensors")))
    moved = max((runs["padded"][k][: len(base[k])] - base[k]).abs().max().item() for k in base)
    difference = max((runs["padded"][k] - runs["flat"][k]).abs().max().item() for k in base)
    assert difference < 0.05 * moved, (difference, moved)


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_opt"])
def test_packed_row_logits_equal_examples_run_alone(model_fixture, request):
    model_path = request.getfixturevalue(model_fixture)
    tokenizer, examples = tokenizer_and_examples(model_path, max_length=512)
    model = load(model_path, tokenizer)
    groups, fill = pack([len(e["input_ids"]) for e in examples], 512)
    rows = [[examples[i] for i in group] for group in groups]
    assert len(rows) <= len(examples) / 3 and fill > 0.8
    collator = Collator(tokenizer, flatten=True)
    needs_mask = mask_needed_to_keep_examples_apart(model, collator, "cpu")
    assert needs_mask == (model_fixture == "tiny_opt")  # OPT builds its mask without the position ids
    with torch.no_grad():
        for row in rows[:3]:
            batch = collator([row])
            labels = batch.pop("labels")
            if needs_mask:
                batch["attention_mask"] = causal_mask_from_positions(model, batch["position_ids"])
            packed_logits = model(**batch).logits[0]
            start = 0
            for example in row:
                alone = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
                n = len(example["input_ids"])
                torch.testing.assert_close(packed_logits[start:start + n], alone, rtol=0, atol=1e-5)
                # the example's loss: its own labels, the seam masked
                seam_labels = labels[0, start:start + n]
                assert seam_labels[0] == IGNORE_INDEX and torch.equal(seam_labels[1:], torch.tensor(example["labels"][1:]))
                start += n


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_opt"])
def test_packed_rows_stay_rows_each_example_as_alone_and_the_gradients_of_padded_batches(model_fixture, request):
    """A step of several packed rows is [rows, longest row], not one flattened row; every example's logits are its own
    alone, and the loss and gradients are those of the same examples in a padded batch."""
    model_path = request.getfixturevalue(model_fixture)
    tokenizer, examples = tokenizer_and_examples(model_path, max_length=256)
    model = load(without_dropout(model_path, request.getfixturevalue("tmp_path") / "model"), tokenizer)
    groups, _ = pack([len(e["input_ids"]) for e in examples], 256)
    rows = [[examples[i] for i in group] for group in groups[:3]]
    collator = Collator(tokenizer, flatten=True, target_logits_only=True)
    needs_mask = mask_needed_to_keep_examples_apart(model, collator, "cpu")
    batch = collator(rows)
    longest = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    assert batch["input_ids"].shape == (3, longest) and "attention_mask" not in batch
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "logits_to_keep")}
    if needs_mask:
        inputs["attention_mask"] = causal_mask_from_positions(model, inputs["position_ids"])
    with torch.no_grad():
        logits = model(**inputs).logits
        for r, row in enumerate(rows):
            start = 0
            for example in row:
                n = len(example["input_ids"])
                alone = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
                torch.testing.assert_close(logits[r, start:start + n], alone, rtol=0, atol=1e-5)
                start += n
    flat = [e for row in rows for e in row]  # the same examples, padded: the targets' loss and gradients
    padded = Collator(tokenizer)(flat)
    model.zero_grad()
    expected_loss = model(**padded).loss
    expected_loss.backward()
    expected = {n: q.grad.clone() for n, q in model.named_parameters()}
    model.zero_grad()
    loss = target_token_loss(model(**inputs, logits_to_keep=batch["logits_to_keep"]), batch["labels"])
    loss.backward()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-5, atol=1e-6)


def perturbation_moves(model, batch_of, first, second) -> float:
    """How far the second example's logits move when the first example's tokens change."""
    changed = {**first, "input_ids": [(t + 7) % 500 + 3 for t in first["input_ids"]]}
    with torch.no_grad():
        a, b = (model(**batch_of([x, second])).logits[0, -len(second["input_ids"]):] for x in (first, changed))
    return (a - b).abs().max().item()


def test_no_example_sees_another_and_the_known_leaks_would(tiny_llama):
    tokenizer, examples = tokenizer_and_examples(tiny_llama, count=2)
    model = load(tiny_llama, tokenizer)
    collator = Collator(tokenizer, flatten=True, target_logits_only=True)
    batch = collator(examples)
    assert "attention_mask" not in batch and batch["use_cache"] is False  # the two guards
    assert batch["position_ids"][0, len(examples[0]["input_ids"])] == 0

    def ours(pair):
        out = collator(pair)
        out.pop("labels"), out.pop("logits_to_keep")
        return out

    def with_ones_mask(pair):  # what a padded collator would add: a 2-D mask of ones
        out = ours(pair)
        return out | {"attention_mask": torch.ones_like(out["input_ids"])}

    def with_cache(pair):  # a model called with use_cache=True builds a cache, and then no packed mask
        return ours(pair) | {"use_cache": True}

    first, second = examples
    assert perturbation_moves(model, ours, first, second) == 0.0
    assert perturbation_moves(model, with_ones_mask, first, second) > 1e-3
    assert perturbation_moves(model, with_cache, first, second) > 1e-3


def test_a_model_that_mixes_examples_is_refused(tiny_llama):
    tokenizer, _ = tokenizer_and_examples(tiny_llama, count=1)

    class Mixer(torch.nn.Module):  # every position sees the whole row, whatever the mask
        def __init__(self):
            super().__init__()
            self.config = LlamaConfig(vocab_size=64, hidden_size=8, num_attention_heads=2, num_hidden_layers=1)
            self.embed = torch.nn.Embedding(64, 8)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, input_ids, position_ids=None, attention_mask=None, use_cache=None):
            hidden = self.embed(input_ids)
            return types.SimpleNamespace(logits=hidden + hidden.mean(dim=1, keepdim=True))

    with pytest.raises(UserError, match="attend to each other"):
        mask_needed_to_keep_examples_apart(Mixer(), Collator(tokenizer, flatten=True), "cpu")


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_opt"])
def test_target_token_loss_equals_the_models_own_loss(model_fixture, request):
    """Logits at target positions only, our cross-entropy: the same loss and the same gradients as the model's."""
    model_path = request.getfixturevalue(model_fixture)
    tokenizer, examples = tokenizer_and_examples(model_path, count=6)
    model = load(model_path, tokenizer)
    batch = Collator(tokenizer)(examples)  # padded
    keep = next_token_is_target(batch["labels"])
    targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert int(keep.sum()) == targets < batch["labels"].numel() / 2  # most positions need no logits
    for count in (None, targets * 3):  # a micro-batch's own mean, or a share of a larger step's
        model.zero_grad()
        theirs = model(**batch, num_items_in_batch=count) if count else model(**batch)
        theirs.loss.backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        ours = target_token_loss(model(**inputs, logits_to_keep=keep), batch["labels"], count)
        ours.backward()
        torch.testing.assert_close(ours, theirs.loss, rtol=1e-6, atol=1e-6)
        for name, parameter in model.named_parameters():
            torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-5, atol=1e-7)


def test_best_fit_decreasing():
    lengths = [7, 5, 4, 4, 3, 2, 2, 1, 12]
    rows = pack_best_fit_decreasing(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # every example once, none split
    assert [12] in [[lengths[i] for i in row] for row in rows]  # an over-long example alone
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows if len(row) > 1)
    # 28 tokens fit 3 rows of 10 at best (7+3, 5+4+1, 4+2+2), plus the 12 alone: BFD finds that optimum
    assert sorted(sorted(lengths[i] for i in row) for row in rows) == [[1, 4, 5], [2, 2, 4], [3, 7], [12]]


def test_best_fit_decreasing_by_rooms_is_the_plain_algorithm():
    """The O(n log n) packing (rows kept by free room) makes the very rows of the plain one (every row searched)."""
    def plain(lengths, capacity):
        rows, free = [], []  # (free tokens, row number)
        for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
            fits = [(room, row) for room, row in free if room >= lengths[index]]
            if fits:
                room, row = min(fits)
                free.remove((room, row))
                rows[row].append(index)
                free.append((room - lengths[index], row))
            else:
                rows.append([index])
                if capacity > lengths[index]:
                    free.append((capacity - lengths[index], len(rows) - 1))
        return rows

    generator = random.Random(0)
    for capacity, longest in ((64, 80), (512, 400), (2048, 300)):
        lengths = [generator.randint(1, longest) for _ in range(3000)]
        assert pack_best_fit_decreasing(lengths, capacity) == plain(lengths, capacity)


@pytest.mark.slow  # trains (the fast tier trains nothing)
def test_packing_trains_with_fewer_fuller_steps(tiny_llama, tmp_path):
    output_dir = tmp_path / "out"
    flags = tiny_run_flags(tiny_llama, output_dir, steps=6) + ["--packing", "True", "--per_device_train_batch_size", "2",
                                                               "--model_max_length", "512"]
    assert main(["train", *flags]) == 0
    summary = json.loads((output_dir / "train_results.json").read_text())
    data = summary["data"]
    assert 0 < data["packed_rows"] < data["kept"] / 2 and data["packed_fill"] > 0.8
    # the rows of a step stay rows, padded to the longest: little padding, counted as such (not as tokens)
    assert 0.0 < summary["speed"]["padding_fraction"] < 1 - data["packed_fill"] + 0.1
    losses = [e["loss"] for e in summary["losses"]]
    assert losses[-1] < losses[0]


@pytest.mark.slow
@pytest.mark.distributed
def test_loss_is_the_mean_over_the_steps_targets_across_ranks_and_micro_batches(tiny_llama, ranks, tmp_path):
    """2 ranks × 2 accumulated padding-free micro-batches of 2 = one process's padded batch of 8: the same weights."""
    model = without_dropout(tiny_llama, tmp_path / "model")
    single = train_weights(model, tmp_path / "single")
    flags = tiny_run_flags(model, tmp_path / "ranks", steps=6, learning_rate=0.5) + [
        "--optim", "sgd", "--padding_free", "True", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2"]
    result = ranks.torchrun("train.py", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = {k: v for s in sorted((tmp_path / "ranks").glob("model-*.safetensors")) for k, v in load_file(s).items()}
    assert single.keys() == ranks.keys()
    assert max((single[k] - ranks[k]).abs().max().item() for k in single) < 1e-6


def test_flash_attention_gets_the_boundaries_as_varlen_arguments(tiny_llama):
    tokenizer, examples = tokenizer_and_examples(tiny_llama, count=3)
    batch = Collator(tokenizer, flatten=True, flash_attention=True)(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    bounds = [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == bounds
    assert batch["max_length_q"] == max(lengths) and "attention_mask" not in batch
