"""The inference engine: batched generation equals one request at a time, seeded sampling does not depend on the
batch, stop strings and budgets end answers (and never leak into a stream), scores equal the model's own, and the
prompt template is the one the run saved. Plus the prompt-set reader and `instructune generate`'s three modes."""

import io
import json

import pytest
import torch

from instructune.data.formats import Message
from instructune.data.prompts import Prompt, read_answers, read_prompts
from instructune.cli import main
from instructune.errors import DataError, UserError
from instructune.inference.engine import Request, Sampling, load, saved_template

from conftest import PYTHON, SHARED_DATA, run_command

PROMPTS = [[Message("user", "Give three tips for staying healthy.")],
           [Message("user", "Translate the sentence.", "The cat sat on the mat, and then it went to sleep for a while.")],
           [Message("user", "Hi")]]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return load(str(tiny_llama))


def ids(engine, i):
    return engine.prompt_ids(PROMPTS[i])


def test_a_batch_of_prompts_of_different_lengths_gives_what_each_gives_alone(engine):
    greedy = Sampling(max_new_tokens=12)
    alone = [engine.generate([Request(ids(engine, i), greedy)])[0] for i in range(3)]
    together = engine.generate([Request(ids(engine, i), greedy) for i in range(3)])
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.text for c in together] == [c.text for c in alone]
    assert all(c.finish_reason == "length" and len(c.token_ids) == 12 for c in alone)  # a random model never ends
    # the same as transformers' own greedy generate
    reference = engine.model.generate(torch.tensor([ids(engine, 0)]), max_new_tokens=12, do_sample=False)
    assert alone[0].token_ids == reference[0, len(ids(engine, 0)):].tolist()


def test_a_seeded_request_samples_the_same_tokens_whatever_it_is_batched_with(engine):
    seeded = Sampling(max_new_tokens=10, temperature=1.0, top_p=0.95, top_k=50, seed=7)
    alone = engine.generate([Request(ids(engine, 0), seeded)])[0].token_ids
    batched = engine.generate([Request(ids(engine, 1), Sampling(max_new_tokens=4, temperature=0.7)),
                               Request(ids(engine, 0), seeded), Request(ids(engine, 2))])[1].token_ids
    other_seed = engine.generate([Request(ids(engine, 0), Sampling(10, 1.0, 0.95, 50, seed=8))])[0].token_ids
    greedy = engine.generate([Request(ids(engine, 0), Sampling(max_new_tokens=10))])[0].token_ids
    assert batched == alone and other_seed != alone and greedy != alone


def test_top_k_1_is_greedy(engine):
    greedy = engine.generate([Request(ids(engine, 0), Sampling(max_new_tokens=8))])[0].token_ids
    sampled = engine.generate([Request(ids(engine, 0), Sampling(max_new_tokens=8, temperature=1.5, top_k=1))])[0]
    assert sampled.token_ids == greedy


def test_stop_strings_end_the_answer_and_never_reach_the_stream(engine):
    full = engine.generate([Request(ids(engine, 0), Sampling(max_new_tokens=24))])[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]  # three characters from the middle of the greedy answer
    assert len(stop.strip()) == 3, full
    pieces = []
    stopped = engine.generate([Request(ids(engine, 0), Sampling(max_new_tokens=24, stop=("zzzz", stop)),
                                       on_text=pieces.append)])[0]
    assert stopped.text == full[: full.index(stop)] == "".join(pieces)
    assert stopped.finish_reason == "stop" and stop not in "".join(pieces)
    assert engine.tokenizer.decode(stopped.token_ids) == stopped.text  # the tokens past the stop string are dropped


def test_budget_is_capped_by_the_context_and_a_prompt_that_fills_it_is_refused(engine):
    long = [engine.tokenizer.bos_token_id] + [5] * (engine.context_length - 3)
    completion = engine.generate([Request(long, Sampling(max_new_tokens=50))])[0]
    assert len(completion.token_ids) == 2 and completion.finish_reason == "length"
    with pytest.raises(UserError, match=f"this model's context is {engine.context_length} tokens"):
        engine.generate([Request(long + [5, 5], Sampling())])


def test_scores_are_the_models_log_probabilities(engine):
    prompt = ids(engine, 1)
    completion = engine.generate([Request(prompt, Sampling(max_new_tokens=5), logprobs=3)])[0]
    sequence = prompt + completion.token_ids
    logits = engine.model(torch.tensor([sequence])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[torch.arange(len(sequence) - 1), torch.tensor(sequence[1:])]
    got = torch.tensor([entry.logprob for entry in completion.logprobs[1:]])
    assert completion.logprobs[0].logprob is None and len(completion.logprobs) == len(sequence)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # greedy tokens are the likeliest of their place
    for entry in completion.logprobs[len(prompt):]:
        assert len(entry.top) <= 3 and entry.logprob == pytest.approx(max(entry.top.values()), abs=1e-6)


def test_the_template_comes_from_the_saved_run(tiny_llama, tmp_path):
    run = tmp_path / "run"
    (run / "merged").mkdir(parents=True)
    (run / "train_results.json").write_text(json.dumps({"prompt_template": "chat"}))
    assert saved_template(str(run)) == saved_template(str(run / "merged")) == "chat"  # a merged adapter: its run's
    assert saved_template(str(tiny_llama)) == "alpaca"


def test_alpaca_prompts_and_chat_template_refusal(engine):
    text = engine.tokenizer.decode(engine.prompt_ids([Message("system", "Be brief."), Message("user", "Hi", "there")]))
    assert "### Instruction:\nHi\n\n### Input:\nthere\n\n### Response:" in text and "Be brief" not in text
    with pytest.raises(UserError, match="no chat template"):  # the tiny tokenizer has none
        engine.prompt_ids([Message("user", "a"), Message("assistant", "b"), Message("user", "c")])


def test_prompt_sets_in_each_format(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"instruction": "A", "input": "x", "output": "ignored"}, {"instruction": "B", "instances": [{"input": "y"}, {"input": ""}]},
            {"question_id": 1, "text": "C"}, {"id": "k", "prompt": "D"}, {"idx": 1, "Instruction": "E"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert read_prompts(path) == [Prompt("A", "x"), Prompt("B", "y"), Prompt("B"), Prompt("C"), Prompt("D"), Prompt("E")]
    path.write_text(json.dumps({"question": "?"}) + "\n")
    with pytest.raises(DataError, match=r"mixed.jsonl:1: fits no known prompt format"):
        read_prompts(path)
    path.write_text('{"instruction": "A", "output": "a"}\n{"instruction": "B", "output": 3}\n')
    with pytest.raises(DataError, match=r"jsonl:2: field 'output' \(the model's answer\) must be a string"):
        read_answers(path)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent: the real prompt sets cannot be read")
def test_the_four_shared_evaluation_sets_are_read():
    counts = {name: len(read_prompts(SHARED_DATA / f"{name}_test_set.jsonl")) for name in ("vicuna", "koala", "wizardlm", "sinstruct")}
    assert counts == {"vicuna": 80, "koala": 180, "wizardlm": 218, "sinstruct": 252}


@pytest.mark.slow  # a launched process
def test_generate_command_streams_an_answer_to_the_terminal(tiny_llama, engine):
    expected = engine.generate([Request(engine.prompt_ids([Message("user", "Say hi.")]), Sampling(6))])[0].text.strip()
    one = run_command([PYTHON, "-m", "instructune.cli", "generate", "--model", str(tiny_llama), "--max_new_tokens", "6",
                       "--instruction", "Say hi."])
    assert one.returncode == 0 and one.stdout.strip() == expected, one.stderr[-2000:]


def test_generate_command_interactive_and_a_file(tiny_llama, engine, tmp_path, capsys, monkeypatch):
    base = ["generate", "--model", str(tiny_llama), "--max_new_tokens", "6"]
    expected = [engine.generate([Request(engine.prompt_ids([Message("user", q)]), Sampling(6))])[0].text.strip()
                for q in ("Say hi.", "Name a colour.")]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"question_id": 1, "text": "Say hi."}\n{"question_id": 2, "text": "Name a colour."}\n')
    output = tmp_path / "out" / "answers.jsonl"
    assert main(base + ["--input_file", str(prompts), "--output_file", str(output), "--batch_size", "2"]) == 0
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(l["instruction"], l["output"]) for l in lines] == list(zip(("Say hi.", "Name a colour."), expected))
    assert lines[0]["generator"] == tiny_llama.name

    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("Say hi.\nName a colour.\n\n"))
    assert main(base + ["--interactive"]) == 0
    assert capsys.readouterr().out.split("\n")[:2] == expected

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"nope": 1}\n')
    assert main(base + ["--input_file", str(bad), "--output_file", str(tmp_path / "never.jsonl")]) == 2
    assert "bad.jsonl:2: fits no known prompt format" in capsys.readouterr().err
    assert not list(tmp_path.glob("never.jsonl*"))


@pytest.mark.slow
def test_a_model_fine_tuned_on_short_examples_serves_its_whole_context(tiny_llama, tmp_path):
    """Seen: the tokenizer was saved with the training length (128 here) and the engine served at that: an 8K model
    fine-tuned at 512 refused prompts over 512 tokens. The context is the model's; the training length is the run's."""
    from test_train import tiny_run_flags

    flags = tiny_run_flags(tiny_llama, tmp_path / "out", steps=1)
    flags[flags.index("--model_max_length") + 1] = "128"
    assert main(["train", *flags]) == 0
    engine = load(str(tmp_path / "out"))
    assert engine.context_length == 512 and engine.tokenizer.model_max_length != 128
    assert json.loads((tmp_path / "out" / "train_results.json").read_text())["model_max_length"] == 128
    engine.check_fits(list(range(300)))  # a prompt longer than the training length is served


def test_a_prompt_file_keeps_line_separators_inside_its_strings(tmp_path):
    """Seen: prompt files were split with splitlines(), which breaks a JSON line at a U+2028 inside a string."""
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"instruction": "first\u2028second", "input": "x\u0085y"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    assert read_prompts(path) == [Prompt("first\u2028second", "x\u0085y")]
