"""Instruction formats as conversations, per-turn masking, mixing with sizes, dedup, and `data inspect`."""

import json
import re
import shutil

import pytest
from transformers import AutoTokenizer

from instructune.cli import main
from instructune.data import IGNORE_INDEX, encode_conversations, load_conversations, render_segments
from instructune.data.formats import Message
from instructune.data.sources import DatasetSpec, load_mix, parse_datasets
from instructune.data.templates import ALPACA_NO_INPUT, ALPACA_WITH_INPUT
from instructune.errors import DataError

from conftest import PYTHON, SAMPLE_DATA, SHARED_DATA, run_command

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SHAREGPT = [
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi there"},
                       {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Add 2 and 3."},
                       {"from": "gpt", "value": "5"}]},
    {"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]},
]
MESSAGES = [{"messages": [{"role": "user", "content": "Capital of Italy?"}, {"role": "assistant", "content": "Rome."}]}]


def write(path, rows, lines=True):
    path.write_text("\n".join(json.dumps(r) for r in rows) if lines else json.dumps(rows))
    return path


def test_every_format_becomes_a_conversation(tmp_path):
    dolly = write(tmp_path / "dolly.jsonl", [{"instruction": "Summarise.", "context": "A long text.", "response": "Short.",
                                               "category": "summarization"}])
    seed = write(tmp_path / "seed.jsonl", [{"instruction": "Translate.", "instances": [
        {"input": "Hola", "output": "Hello"}, {"input": "Adiós", "output": "Goodbye"}]}])
    sharegpt = write(tmp_path / "share.json", SHAREGPT, lines=False)
    messages = write(tmp_path / "messages.jsonl", MESSAGES)
    (conversation,) = load_conversations(str(dolly))
    assert conversation.format == "dolly" and conversation.messages == (
        Message("user", "Summarise.", "A long text."), Message("assistant", "Short."))
    instances = load_conversations(str(seed))
    assert [c.messages[0].context for c in instances] == ["Hola", "Adiós"] and instances[1].source.endswith("instance 1")
    first, second = load_conversations(str(sharegpt))
    assert [m.role for m in first.messages] == ["system", "user", "assistant", "user", "assistant"] and first.multi_turn
    assert load_conversations(str(messages))[0].messages[-1] == Message("assistant", "Rome.")


def test_the_real_shared_sets_load(tmp_path):
    if not (SHARED_DATA / "seed_tasks.jsonl").exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    seed_rows = [json.loads(line) for line in (SHARED_DATA / "seed_tasks.jsonl").read_text().splitlines()]
    seed = load_conversations(str(SHARED_DATA / "seed_tasks.jsonl"))
    assert len(seed_rows) == 175 and len(seed) == sum(len(r["instances"]) for r in seed_rows)
    dolly = load_conversations(str(SHARED_DATA / "dolly_3k.json"))
    assert len(dolly) == 2996 and {c.format for c in dolly} == {"alpaca"}


@pytest.mark.parametrize("row, message", [
    ({"question": "a", "answer": "b"}, "fits no known format; expected instruction/output (Alpaca)"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "conversations[0]: unknown from 'robot'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"instruction": "a", "instances": []}, "field 'instances' must be a non-empty list"),
])
def test_a_record_that_fits_no_format_is_named(tmp_path, row, message):
    data = write(tmp_path / "d.jsonl", [{"instruction": "ok", "output": "fine"}, row])
    with pytest.raises(DataError, match=f"^{re.escape(str(data))}:2: .*{re.escape(message)}"):
        load_conversations(str(data))


def test_alpaca_template_is_alpacas_byte_for_byte(smollm2, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    for context, pattern in (("", ALPACA_NO_INPUT), ("1, 2", ALPACA_WITH_INPUT)):
        rows = [{"instruction": "Add.", "input": context, "output": "3"}]
        (conversation,) = load_conversations(str(write(tmp_path / "d.jsonl", rows)))
        assert render_segments([conversation], "alpaca", tokenizer) == [[
            (pattern.format(instruction="Add.", input=context), False), ("3", True)]]


def test_every_assistant_turn_is_a_target_and_only_those(smollm2, tmp_path):
    """SmolLM2's own ChatML template: the targets are exactly the assistant turns with their end-of-turn token."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    conversations = load_conversations(str(write(tmp_path / "share.json", SHAREGPT, lines=False)))
    examples, _ = encode_conversations(conversations, tokenizer, "alpaca", 512)
    ids, labels = examples[0]["input_ids"], examples[0]["labels"]
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    spans.append(current) if current else None
    assert [tokenizer.decode(s) for s in spans] == ["Hello!<|im_end|>", "5<|im_end|>"]
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in conversations[0].messages], tokenize=False).rstrip("\n")
    everything, _ = encode_conversations(conversations, tokenizer, "alpaca", 512, train_on_inputs=True)
    assert everything[0]["labels"] == everything[0]["input_ids"]


def test_mixing_sizes_are_exact_reproducible_and_logged(tmp_path):
    sample = json.loads(SAMPLE_DATA.read_text())
    other = write(tmp_path / "other.jsonl", [{"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i)))}
                                             for i in range(1, 41)])
    specs = parse_datasets(f"{SAMPLE_DATA}:all,{other}:10,{tmp_path / 'share.json'}:50%")
    write(tmp_path / "share.json", SHAREGPT, lines=False)
    mix = load_mix(specs, seed=1)
    assert mix.sources == {str(SAMPLE_DATA): len(sample), str(other): 10, str(tmp_path / "share.json"): 1}
    assert [c.source for c in load_mix(specs, seed=1).conversations] == [c.source for c in mix.conversations]
    assert [c.source for c in load_mix(specs, seed=2).conversations] != [c.source for c in mix.conversations]
    assert parse_datasets(json.dumps([f"{other}:10", {"path": str(SAMPLE_DATA), "size": "5%", "format": "alpaca"}])) == [
        DatasetSpec(str(other), "10"), DatasetSpec(str(SAMPLE_DATA), "5%", "alpaca")]
    with pytest.raises(DataError, match=f"^{other}: 41 records asked for, but it has 40 usable ones$"):
        load_mix(parse_datasets(f"{other}:41"))
    with pytest.raises(DataError, match="expected PATH, PATH:all, PATH:COUNT or PATH:PERCENT%"):
        parse_datasets(f"{other}:lots")


def test_duplicates_are_removed_across_sets(tmp_path):
    a = write(tmp_path / "a.jsonl", [{"instruction": "Say hi.", "output": "Hi."}, {"instruction": "Say bye.", "output": "Bye."}])
    b = write(tmp_path / "b.jsonl", [{"instruction": "Say hi.", "output": "Hi."}, {"instruction": "  say  HI. ", "output": "hi."},
                                     {"instruction": "New.", "output": "Yes."}])
    mix = load_mix(parse_datasets(f"{a},{b}"))
    assert len(mix.conversations) == 3 and mix.duplicates == {"exact": 1, "normalised": 1}
    assert len(load_mix(parse_datasets(f"{a},{b}"), dedup=False).conversations) == 5


@pytest.mark.parametrize("first, second, same", [
    (("Say hi.", "", "Hi."), ("\tSAY\n hi. ", "", " hi.\n"), True),  # case and white space, at the ends too
    (("Say", "hi.", "Hi."), ("Say hi.", "", "Hi."), False),  # the same words in other fields are not the same
    (("Say hi.", "", "Hi. Bye."), ("Say hi. Hi.", "", "Bye."), False),
    (("Say hi.", "", ""), ("Say hi.", "", " "), True),
])
def test_normalised_duplicates_compare_field_by_field(first, second, same):
    """The normalised key is one text normalised at once: it equals normalising each field apart."""
    from instructune.data.formats import Conversation, Message
    from instructune.data.sources import _keys

    def conversation(instruction, context, reply):
        return Conversation((Message("user", instruction, context), Message("assistant", reply)), "alpaca", "x")

    def apart(c):
        return [(m.role, " ".join(m.content.lower().split()), " ".join(m.context.lower().split())) for m in c.messages]

    one, two = conversation(*first), conversation(*second)
    assert (apart(one) == apart(two)) == same
    assert (_keys(one)[1] == _keys(two)[1]) == same and (_keys(one)[0] == _keys(two)[0]) == (one == two)


def test_data_inspect(tmp_path, smollm2, capsys):
    share = write(tmp_path / "share.json", SHAREGPT, lines=False)
    assert main(["data", "inspect", str(SAMPLE_DATA), f"{share}:all", "--model_max_length", "128", "--output_dir",
                 str(tmp_path / "report"), "--show", "1"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["formats"] == {"alpaca": 125, "sharegpt": 2} and summary["records"] == 127
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    examples, _ = encode_conversations(load_mix(parse_datasets(f"{SAMPLE_DATA},{share}")).conversations, tokenizer,
                                       "alpaca", 10**6)
    assert summary["over_max_length"] == sum(len(e["input_ids"]) > 128 for e in examples) > 0
    assert summary["tokens"]["total"]["max"] == max(len(e["input_ids"]) for e in examples)
    assert (tmp_path / "report" / "lengths.png").read_bytes()[:4] == b"\x89PNG"
    assert "### Response:⟦" in printed and "formats: alpaca 125, sharegpt 2" in printed


@pytest.mark.slow
def test_training_on_a_mix(tiny_llama, tmp_path):
    chat_model = tmp_path / "tiny-chat"
    shutil.copytree(tiny_llama, chat_model)
    config = json.loads((chat_model / "tokenizer_config.json").read_text())
    config["chat_template"] = CHATML
    (chat_model / "tokenizer_config.json").write_text(json.dumps(config))
    share = write(tmp_path / "share.json", SHAREGPT * 3, lines=False)  # 2 unique conversations, 4 duplicates
    result = run_command([PYTHON, "train.py", "--model_name_or_path", str(chat_model), "--datasets",
                          f"{SAMPLE_DATA}:50,{share}:all", "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
                          "--per_device_train_batch_size", "4", "--report_to", "none", "--disable_tqdm", "True"])
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "train_results.json").read_text())["data"]
    assert data["sources"] == {str(SAMPLE_DATA): 50, str(share): 2} and data["duplicates"] == {"exact": 4}
    assert "; from " in result.stderr and "duplicates removed: 4 exact" in result.stderr


def test_datasets_as_a_yaml_list(tmp_path):
    from instructune.config import parse_train_args

    config = tmp_path / "run.yaml"
    config.write_text(f"datasets:\n  - {SAMPLE_DATA}:all\n  - {{path: dolly.jsonl, size: 1000, format: dolly}}\n"
                      f"output_dir: {tmp_path / 'out'}\n")
    _, data_args, _ = parse_train_args(["--config", str(config)])
    assert parse_datasets(data_args.datasets) == [DatasetSpec(str(SAMPLE_DATA), "all"),
                                                  DatasetSpec("dolly.jsonl", "1000", "dolly")]


def test_a_chat_format_needs_a_chat_template(tiny_llama, tmp_path, capsys):
    share = write(tmp_path / "share.json", SHAREGPT, lines=False)
    assert main(["train", "--model_name_or_path", str(tiny_llama), "--data_path", str(share),
                 "--output_dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {share}: record 0: a multi-turn conversation is rendered with the tokenizer's chat template, "
        f"and {tiny_llama} has none")
    assert not (tmp_path / "out").exists()


def test_a_chat_template_that_refuses_a_conversation_names_the_record(tiny_llama, tmp_path, capsys):
    """Templates may refuse (Mistral's and Llama 2's: roles must alternate; some: no system prompt): rendering many
    conversations in one call must still name the one refused, not end in a bare template error."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}"
                               "{{ m['content'] }}{{ eos_token }}{% endfor %}")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    share = write(tmp_path / "share.json", SHAREGPT[1:] + SHAREGPT[:1], lines=False)  # the second has a system turn
    assert main(["train", "--model_name_or_path", str(model), "--data_path", str(share), "--output_dir",
                 str(tmp_path / "out"), "--preprocessing_num_workers", "2"]) == 2  # raised in a worker, named here
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {share}: record 1: the tokenizer's chat template refuses this conversation: "
        "TemplateError: System role not supported")
    assert not (tmp_path / "out").exists()
