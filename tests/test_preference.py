"""Preference tuning (--method dpo): pair formats become one conversation shape; the loss and rewards are DPO's (and
IPO's) computed by hand; training widens the margin of held-out pairs; a precomputed reference trains the same model
as a live one; with LoRA the reference is the base; ZeRO-2, ZeRO-3 and FSDP end where DDP does, the reference
partitioned where the policy is."""

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from instructune.cli import main
from instructune.data.batching import Collator
from instructune.data.encode import COLUMNS, DROPPED, PAIR_COLUMNS, encode_columns
from instructune.data.formats import Message, to_conversations
from instructune.data.sources import load_conversations
from instructune.errors import DataError
from instructune.training.preference import preference_loss, sequence_log_probs

from conftest import REPO
from test_distributed import max_difference, weights
from test_train import tiny_run_flags

USER, GOOD, BAD = "Is the sky blue?", "Yes, on a clear day.", "No."
TRL_PLAIN = {"prompt": USER, "chosen": GOOD, "rejected": BAD}
TRL_MESSAGES = {"prompt": [{"role": "user", "content": USER}], "chosen": [{"role": "assistant", "content": GOOD}],
                "rejected": [{"role": "assistant", "content": BAD}]}
ULTRAFEEDBACK = {"prompt": USER, "prompt_id": "0", "score_chosen": 8.0, "score_rejected": 2.0,
                 "chosen": [{"role": "user", "content": USER}, {"role": "assistant", "content": GOOD}],
                 "rejected": [{"role": "user", "content": USER}, {"role": "assistant", "content": BAD}]}
HH = {"chosen": f"\n\nHuman: {USER}\n\nAssistant: {GOOD}", "rejected": f"\n\nHuman: {USER}\n\nAssistant: {BAD}"}


@pytest.mark.parametrize("record", [TRL_PLAIN, TRL_MESSAGES, ULTRAFEEDBACK, HH], ids=["trl", "trl-messages",
                                                                                     "ultrafeedback", "hh"])
def test_pair_formats_become_one_conversation_with_its_rejected_reply(record):
    (conversation,), empty = to_conversations("pairs.json: record 0", record)
    assert conversation.messages == (Message("user", USER), Message("assistant", GOOD))
    assert conversation.rejected == BAD and not empty
    assert conversation.with_rejected_reply().messages[-1] == Message("assistant", BAD)


def test_hh_multi_turn_transcripts_share_their_prefix():
    prefix = "\n\nHuman: Hi.\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit."
    (conversation,), _ = to_conversations("hh.jsonl: line 1", {"chosen": prefix + "\n\nAssistant: An apple.",
                                                               "rejected": prefix + "\n\nAssistant: A carrot."})
    assert [m.role for m in conversation.messages] == ["user", "assistant", "user", "assistant"]
    assert conversation.multi_turn and conversation.rejected == "A carrot."


@pytest.mark.parametrize("record, error", [
    ({**TRL_PLAIN, "rejected": GOOD}, "chosen and rejected are the same reply"),
    ({**ULTRAFEEDBACK, "rejected": [{"role": "user", "content": "Another question?"},
                                    {"role": "assistant", "content": BAD}]}, "differ before their last reply"),
    ({"chosen": HH["chosen"], "rejected": "\n\nHuman: Something else?\n\nAssistant: No."}, "differ before their last"),
    ({**ULTRAFEEDBACK, "prompt": "Another question?"}, "field 'prompt' is not the prompt"),
    ({"chosen": "no transcript", "rejected": "at all"}, "must be a transcript"),
    ({**TRL_MESSAGES, "chosen": [{"role": "user", "content": USER}]}, "must end with an assistant reply"),
], ids=["equal", "other-prompt", "hh-other-prompt", "prompt-mismatch", "not-a-transcript", "no-reply"])
def test_bad_pairs_are_refused_in_one_line_naming_the_record(tmp_path, record, error):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(TRL_PLAIN) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as refused:
        load_conversations(str(path))
    message = str(refused.value)
    assert error in message and f"{path}:2:" in message and "\n" not in message


def test_a_pair_encodes_both_sides_and_is_dropped_whole(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    pair, _ = to_conversations("r", {"prompt": USER, "chosen": GOOD, "rejected": BAD + " " + "very long " * 60})
    columns = encode_columns(pair, tokenizer, "alpaca", 512, pairs=True)
    row = {name: values[0] for name, values in columns.items()}
    chosen_start, chosen_end = row["target_spans"]
    rejected_start, rejected_end = row["rejected_spans"]
    assert tokenizer.decode(row["input_ids"][chosen_start:chosen_end]) == GOOD + tokenizer.eos_token
    assert tokenizer.decode(row["rejected_ids"][rejected_start:rejected_end]).startswith(BAD)
    assert row["input_ids"][:chosen_start] == row["rejected_ids"][:rejected_start]  # the same prompt tokens
    assert row["rejected_length"] == len(row["rejected_ids"]) > row["length"]
    dropped = encode_columns(pair, tokenizer, "alpaca", 128, overlong="drop", pairs=True)  # only the rejected side is too long
    assert dropped["outcome"] == [DROPPED] and dropped["input_ids"] == [[]] and dropped["rejected_ids"] == [[]]
    # Instruction data keeps the columns caches always had (no empty rejected_ columns, the same fingerprint)
    instruction, _ = to_conversations("r", {"instruction": USER, "output": GOOD})
    assert tuple(encode_columns(instruction, tokenizer, "alpaca", 512)) == COLUMNS
    assert tuple(encode_columns(instruction + pair, tokenizer, "alpaca", 512, pairs=True)) == COLUMNS + PAIR_COLUMNS
    with pytest.raises(ValueError, match="a preference pair, encoded without pairs=True"):
        encode_columns(pair, tokenizer, "alpaca", 512)


def hand_log_probs(model, ids: list[int], labels: list[int]) -> float:
    """Σ log p(label | prefix) over the target tokens, from one unpadded forward of one sequence."""
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    return sum(log_probs[i - 1, labels[i]].item() for i in range(1, len(ids)) if labels[i] != -100)


def test_loss_and_rewards_equal_a_hand_computation(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.pad_token = tokenizer.unk_token
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():  # a policy that has moved away from its reference
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    records = [{"prompt": f"Question {i}: {USER}", "chosen": GOOD * (i + 1), "rejected": BAD} for i in range(3)]
    pairs = [c for r in records for c in to_conversations("r", r)[0]]
    columns = encode_columns(pairs, tokenizer, "alpaca", 256, pairs=True)
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    batch = Collator(tokenizer, target_logits_only=True, pairs=True)(rows)
    labels = batch.pop("labels")
    policy_sums, counts = sequence_log_probs(policy(**batch).logits, labels)
    reference_sums, _ = sequence_log_probs(reference(**batch).logits, labels)

    sides = [(row["input_ids"], row["target_spans"]) for row in rows] + [(row["rejected_ids"], row["rejected_spans"])
                                                                        for row in rows]
    for i, (ids, (start, end)) in enumerate(sides):
        labels_i = [-100] * start + ids[start:end] + [-100] * (len(ids) - end)
        assert policy_sums[i].item() == pytest.approx(hand_log_probs(policy, ids, labels_i), abs=1e-3)
        assert reference_sums[i].item() == pytest.approx(hand_log_probs(reference, ids, labels_i), abs=1e-3)
        assert counts[i] == end - start

    beta, n = 0.1, len(rows)
    ratios = [(policy_sums[i] - reference_sums[i]).item() for i in range(2 * n)]
    for kind in ("sigmoid", "ipo"):
        loss, rewards = preference_loss(policy_sums, reference_sums, counts, beta, kind)
        if kind == "sigmoid":
            expected = [math.log1p(math.exp(-beta * (ratios[i] - ratios[n + i]))) for i in range(n)]
        else:
            expected = [(ratios[i] / counts[i].item() - ratios[n + i] / counts[n + i].item() - 1 / (2 * beta)) ** 2
                        for i in range(n)]
        assert loss.item() == pytest.approx(sum(expected) / n, rel=1e-5)
        assert rewards["rewards/chosen"].tolist() == pytest.approx([beta * r for r in ratios[:n]], rel=1e-5)
        assert rewards["rewards/margins"].tolist() == pytest.approx(
            [beta * (ratios[i] - ratios[n + i]) for i in range(n)], rel=1e-5, abs=1e-7)
        assert rewards["rewards/accuracies"].tolist() == [float(ratios[i] > ratios[n + i]) for i in range(n)]


def write_pairs(path, count: int = 48, seed: int = 0) -> str:
    """Pairs with a preference a tiny model can learn and carry to unseen prompts: the chosen reply agrees."""
    rng = random.Random(seed)
    things = ["the river", "my garden", "this book", "the weather", "that song", "our town", "the market", "a bicycle",
              "the museum", "the ocean", "a forest", "the library", "an orange", "the train", "a mountain", "the bread"]
    records = []
    for i in range(count):
        thing = f"{rng.choice(things)} number {i}"
        records.append({"prompt": f"Do you like {thing}?", "chosen": f"Yes, I like {thing} very much.",
                        "rejected": f"No, {thing} is terrible."})
    path.write_text(json.dumps(records))
    return str(path)


def dpo_flags(model, data, output_dir, steps: int = 16, learning_rate: float = 5e-3) -> list[str]:
    flags = tiny_run_flags(model, output_dir, steps=steps, learning_rate=learning_rate)
    flags[flags.index("--data_path") + 1] = data
    flags[flags.index("--per_device_train_batch_size") + 1] = "4"
    return ["--method", "dpo", *flags, "--model_max_length", "128"]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_widens_the_margin_of_held_out_pairs(loss, tiny_llama, tmp_path):
    data = write_pairs(tmp_path / "pairs.json")
    flags = dpo_flags(tiny_llama, data, tmp_path / "out", steps=20) + ["--val_set_size", "8", "--logging_steps", "5",
                                                                      "--dpo_loss", loss]
    assert main(["train", *flags]) == 0
    summary = json.loads((tmp_path / "out" / "train_results.json").read_text())
    assert summary["method"] == "dpo" and summary["preference"]["reference"] == "frozen copy"
    assert summary["preference"]["loss"] == loss
    start = math.log(2) if loss == "sigmoid" else (1 / (2 * 0.1)) ** 2  # the loss at zero margin
    assert summary["losses"][0]["loss"] < start + 1e-3 and summary["losses"][-1]["loss"] < 0.6 * start
    held_out = [e for e in summary["rewards"] if "eval_rewards/margins" in e]
    assert held_out[0]["eval_rewards/margins"] == 0  # before training the policy is its reference
    assert held_out[-1]["eval_rewards/margins"] > 1 and held_out[-1]["eval_rewards/accuracies"] == 1
    trained = [e for e in summary["rewards"] if "rewards/margins" in e]
    assert trained[-1]["rewards/margins"] > trained[0]["rewards/margins"]
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # a plain Hugging Face folder


@pytest.mark.slow
def test_precomputed_reference_log_probs_train_the_same_model(tiny_llama, tmp_path, caplog):
    data = write_pairs(tmp_path / "pairs.json", count=24)
    cache = ["--tokenized_cache_dir", str(tmp_path / "cache"), "--optim", "sgd"]
    runs = {}
    for name, extra in (("live", []), ("precomputed", ["--precompute_ref_log_probs", "True"]),
                        ("cached", ["--precompute_ref_log_probs", "True"])):  # the second one reads the first's
        caplog.clear()
        assert main(["train", *dpo_flags(tiny_llama, data, tmp_path / name, steps=8, learning_rate=0.05), *cache,
                     *extra]) == 0
        runs[name] = weights(tmp_path / name)
        summary = json.loads((tmp_path / name / "train_results.json").read_text())
        assert summary["preference"]["held_weights"] == (0 if extra else sum(t.numel() for t in runs[name].values()))
        assert summary["losses"][-1]["loss"] < summary["losses"][0]["loss"] - 0.05  # it trained
    assert "computed and cached" not in caplog.text and "reference log-probs: " in caplog.text  # the last run read them
    assert max_difference(runs["precomputed"], runs["live"]) < 1e-6
    assert max_difference(runs["cached"], runs["precomputed"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("quantised", [False, True], ids=["lora", "qlora"])
def test_lora_dpo_trains_only_the_adapter_against_the_base(quantised, tiny_llama, tmp_path):
    data = write_pairs(tmp_path / "pairs.json", count=24)
    flags = dpo_flags(tiny_llama, data, tmp_path / "out", steps=6) + ["--lora_r", "8", "--lora_target_modules",
                                                                     "all-linear", "--logging_steps", "1",
                                                                     "--load_in_4bit", str(quantised)]
    assert main(["train", *flags]) == 0
    summary = json.loads((tmp_path / "out" / "train_results.json").read_text())
    assert summary["preference"] == {"beta": 0.1, "loss": "sigmoid", "reference": "the base model, adapter disabled",
                                     "held_weights": 0}
    margins = [e["rewards/margins"] for e in summary["rewards"]]
    assert margins[0] == 0 and margins[-1] > 0  # at the first step the adapter adds nothing: the policy is the base
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert not list((tmp_path / "out").glob("model*.safetensors"))


@pytest.mark.parametrize("method, data, extra, error", [
    ("sft", "pairs", [], "preference pairs (chosen/rejected): train them with --method dpo"),
    ("dpo", "alpaca", [], "--method dpo trains on preference pairs"),
    ("dpo", "pairs", ["--packing", "True"], "without --packing and --padding_free"),
    ("dpo", "pairs", ["--beta", "0"], "--beta 0: must be above 0"),
    ("sft", "alpaca", ["--precompute_ref_log_probs", "True"], "--precompute_ref_log_probs is for --method dpo"),
])
def test_method_and_data_must_agree(tiny_llama, tmp_path, capsys, method, data, extra, error):
    path = write_pairs(tmp_path / "pairs.json", count=8) if data == "pairs" else None
    flags = dpo_flags(tiny_llama, path or "alpaca_data.json", tmp_path / "out")
    flags[flags.index("--method") + 1] = method
    assert main(["train", *flags, *extra]) == 2
    assert error in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def ddp_dpo(ranks, tiny_llama, tmp_path_factory):
    work = tmp_path_factory.mktemp("dpo-ddp")
    data = write_pairs(work / "pairs.json", count=24)
    return data, train_distributed(ranks, tiny_llama, data, work / "out", "ddp")


def train_distributed(ranks, model, data, output_dir, strategy: str, *extra: str) -> dict:
    flags = dpo_flags(model, data, output_dir, steps=6, learning_rate=0.05)
    flags[flags.index("--per_device_train_batch_size") + 1] = "2"
    result = ranks.torchrun("train.py", *flags, "--optim", "sgd", "--strategy", strategy, *extra)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((output_dir / "train_results.json").read_text())
    assert summary["world_size"] == 2 and summary["losses"][-1]["loss"] < summary["losses"][0]["loss"]
    return {"weights": weights(output_dir), **summary["preference"]}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["zero2", "zero3", "fsdp", "zero3_precomputed"])
def test_dpo_under_every_strategy_ends_where_ddp_does(strategy, ddp_dpo, ranks, tiny_llama, tmp_path):
    """The precomputed case: each rank computes half the pairs' reference log-probs with the partitioned policy
    before the first step, and the halves are gathered."""
    data, ddp = ddp_dpo
    precomputed = strategy.endswith("_precomputed")
    run = train_distributed(ranks, tiny_llama, data, tmp_path / "out", strategy.removesuffix("_precomputed"),
                            *(["--precompute_ref_log_probs", "True", "--tokenized_cache_dir", str(tmp_path / "cache")]
                              if precomputed else []))
    assert max_difference(run["weights"], ddp["weights"]) < 1e-6
    whole = ddp["held_weights"]
    assert whole == sum(t.numel() for t in ddp["weights"].values())  # DDP: a whole reference on each rank
    if precomputed:
        assert run["reference"] == "precomputed" and run["held_weights"] == 0
    elif strategy == "zero2":
        assert run["held_weights"] == whole and run["wrapper"] == "DeepSpeedEngine"
    else:  # partitioned like the policy: about half on each of the 2 ranks, never a whole copy
        assert run["held_weights"] < 0.7 * whole


@pytest.mark.slow
def test_a_preempted_dpo_run_resumes_to_the_uninterrupted_model(tiny_llama, tmp_path):
    """SIGTERM at step 4 of 8: checkpoint, exit 75; the same command resumes (the reference's cached log-probs read
    back: the resumed policy is no longer the reference) and ends with the weights of the run never stopped. (A live
    reference is rebuilt from the base like the policy's starting point: resume as for SFT, test_guard.py.)"""
    from instructune.cli import run, train
    from instructune.training import guard

    from test_guard import signalled_at

    data = write_pairs(tmp_path / "pairs.json", count=24)
    extra = ["--optim", "sgd", "--tokenized_cache_dir", str(tmp_path / "cache"), "--precompute_ref_log_probs", "True"]
    straight, stopped = (dpo_flags(tiny_llama, data, tmp_path / name, steps=8, learning_rate=0.05) + extra
                         for name in ("straight", "stopped"))
    assert main(["train", *straight]) == 0
    assert run(lambda: train.main(stopped, callbacks=[signalled_at(4, "TERM")])) == guard.PREEMPTED
    assert main(["train", *stopped]) == 0
    assert max_difference(weights(tmp_path / "stopped"), weights(tmp_path / "straight")) < 1e-6


def test_pairs_mix_dedup_and_inspect(smollm2, tmp_path, capsys):
    shipped = json.loads((REPO / "preference_pairs.json").read_text())
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps([shipped[0], TRL_PLAIN]))  # a shipped pair again, and a new one
    shouted = {side: f"\n\nHuman: {USER.upper()}\n\nAssistant:  {reply}" for side, reply in (("chosen", GOOD),
                                                                                            ("rejected", BAD))}
    prefix = "\n\nHuman: Hi.\n\nAssistant: Hello!\n\nHuman: Name a fruit."
    new = {"chosen": prefix + "\n\nAssistant: An apple.", "rejected": prefix + "\n\nAssistant: A carrot."}
    hh = tmp_path / "hh.jsonl"  # TRL_PLAIN's pair as a transcript, then in capitals, then a new pair of 2 turns
    hh.write_text("\n".join(json.dumps(r) for r in [HH, shouted, new]) + "\n")
    assert main(["data", "inspect", f"{REPO / 'preference_pairs.json'}:all", f"{ours}:all", f"{hh}:all",
                 "--output_dir", str(tmp_path / "report"), "--show", "1"]) == 0
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["formats"] == {"preference": len(shipped) + 1, "hh": 1}
    assert summary["duplicates_removed"] == {"exact": 2, "normalised": 1}
    assert summary["preference_pairs"] == summary["records"] == len(shipped) + 2
    printed = capsys.readouterr().out
    assert "(rejected instead:) ⟦" in printed and f"preference pairs: {len(shipped) + 2}" in printed


@pytest.mark.slow
def test_gradient_accumulation_weighs_every_pair_the_same(tiny_llama, tmp_path):
    """4 pairs a step at once, or as 2 micro-batches of 2: the same SGD steps (the loss is a mean over the pairs of a
    micro-batch, divided by the accumulation steps)."""
    data = write_pairs(tmp_path / "pairs.json", count=16)
    runs = {}
    for name, batch, accumulation in (("whole", "4", "1"), ("accumulated", "2", "2")):
        flags = dpo_flags(tiny_llama, data, tmp_path / name, steps=4, learning_rate=0.05)
        flags[flags.index("--per_device_train_batch_size") + 1] = batch
        assert main(["train", *flags, "--optim", "sgd", "--gradient_accumulation_steps", accumulation,
                     "--max_grad_norm", "0"]) == 0  # no clipping: it would hide a wrongly scaled gradient
        runs[name] = weights(tmp_path / name)
    assert max_difference(runs["accumulated"], runs["whole"]) < 1e-6
