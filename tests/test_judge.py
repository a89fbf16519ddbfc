"""`instructune judge` against a real scripted chat-completions judge on 127.0.0.1: each pair scored in both orders,
win/tie/lose counted per test set as AlpaGasus counts them (order swaps and disagreements included), failures apart
and retried on the next run, answers read from files or generated, and the plot written."""

import json

import pytest

from instructune.cli import main
from instructune.eval.pairwise import parse_scores, verdict

from scripted_judge import ScriptedJudge


@pytest.mark.parametrize("a_first, b_first, expected", [
    ((8, 6), (6, 8), "win"), ((8, 6), (5, 5), "win"), ((5, 5), (4, 7), "win"),  # better twice, or once and equal once
    ((5, 5), (5, 5), "tie"), ((9, 3), (9, 3), "tie"), ((3, 9), (3, 9), "tie"),  # equal twice; the judge followed the order
    ((3, 7), (7, 3), "lose"), ((5, 5), (8, 2), "lose"), ((2, 8), (6, 6), "lose"),
])
def test_verdicts_combine_both_orders(a_first, b_first, expected):
    assert verdict(a_first, b_first) == expected


@pytest.mark.parametrize("reply, expected", [
    ("8 7\nBoth fine.", ((8.0, 7.0), "Both fine.")), ("8, 6.5", ((8.0, 6.5), "")), ("9/10 4/10\nwhy", ((9.0, 4.0), "why")),
    ("**7 7**\nsame", ((7.0, 7.0), "same")), ("Assistant 1 is better.\n8 7", None), ("8\nonly one", None),
    ("11 3", None), ("", None),
])
def test_score_lines_are_parsed_strictly(reply, expected):
    assert parse_scores(reply) == expected


def answers(path, pairs):
    path.write_text("\n".join(json.dumps({"instruction": q, "input": "", "output": a}) for q, a in pairs) + "\n")
    return str(path)


@pytest.fixture
def judge():
    server = ScriptedJudge(api_key="judge-key")
    yield server
    server.close()


def test_counts_per_test_set_with_order_swaps_disagreements_and_failures(judge, tmp_path, monkeypatch, capsys):
    vicuna, koala = tmp_path / "vicuna_test_set.jsonl", tmp_path / "koala_test_set.jsonl"
    questions = ["Q1 better", "Q2 equal", "Q3 worse", "Q4 [bias=first]", "Q5 [say=I will not score this]"]
    vicuna.write_text("\n".join(json.dumps({"question_id": i, "text": q}) for i, q in enumerate(questions)))
    prompts = ["K1 better", "K2 [fail=400x1]", "K3 worse"]
    koala.write_text("\n".join(json.dumps({"id": f"koala_{i}", "prompt": p}) for i, p in enumerate(prompts)))
    a = answers(tmp_path / "a.jsonl", zip(questions + prompts, ["[q=8]", "[q=5]", "[q=3]", "x", "x", "[q=9]", "x", "[q=2]"]))
    b = answers(tmp_path / "b.jsonl", zip(questions + prompts, ["[q=6]", "[q=5]", "[q=7]", "y", "y", "[q=2]", "y", "[q=6]"]))
    command = ["judge", "--test_set", str(vicuna), str(koala), "--answers_a", a, "--answers_b", b, "--name_a", "tuned",
               "--name_b", "base", "--judge_url", judge.url, "--judge_model", "scripted", "--output_dir",
               str(tmp_path / "out"), "--retries", "0"]
    monkeypatch.setenv("OPENAI_API_KEY", "judge-key")
    assert main(command) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "judgement.json").read_text())
    assert report["counts"] == {
        "vicuna": {"win": 1, "tie": 2, "lose": 1, "failed": 1},
        "koala": {"win": 1, "tie": 0, "lose": 1, "failed": 1},
        "overall": {"win": 2, "tie": 2, "lose": 2, "failed": 2},
    }
    by_question = {p["instruction"]: p for p in report["pairs"]}
    assert by_question["Q1 better"]["scores_a_first"] == [8, 6] and by_question["Q1 better"]["scores_b_first"] == [6, 8]
    assert by_question["Q4 [bias=first]"]["scores_a_first"] == [9, 3] == by_question["Q4 [bias=first]"]["scores_b_first"]
    assert by_question["Q4 [bias=first]"]["verdict"] == "tie" and by_question["Q1 better"]["reasons"][0]
    assert by_question["K2 [fail=400x1]"]["verdict"] == "failed"
    assert (tmp_path / "out" / "judgement.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "vicuna       win    1  tie    2  lose    1  (failed: 1)" in printed
    assert judge.requests["K1 better"] == 2  # once per order

    assert main(command) == 0  # only the failed replies are asked again
    assert judge.requests["K1 better"] == 2 and judge.requests["K2 [fail=400x1]"] == 3
    counts = json.loads((tmp_path / "out" / "judgement.json").read_text())["counts"]
    assert counts["koala"] == {"win": 1, "tie": 1, "lose": 1, "failed": 0} and counts["vicuna"]["failed"] == 1


def test_answers_are_generated_by_both_models_or_refused_when_missing(judge, tiny_llama, tiny_opt, tmp_path, capsys,
                                                                       monkeypatch):
    from instructune.inference.answers import answer
    from instructune.inference.engine import Sampling, load

    test_set = tmp_path / "wizardlm_test_set.jsonl"
    test_set.write_text('{"idx": 1, "Instruction": "Say hi."}\n{"idx": 2, "Instruction": "Name a colour."}\n')
    out = tmp_path / "out"
    monkeypatch.setenv("OPENAI_API_KEY", "judge-key")
    assert main(["judge", "--test_set", str(test_set), "--model_a", str(tiny_llama), "--model_b", str(tiny_opt),
                 "--max_new_tokens", "5", "--judge_url", judge.url, "--judge_model", "scripted",
                 "--output_dir", str(out)]) == 0
    report = json.loads((out / "judgement.json").read_text())
    assert report["counts"]["wizardlm"] == {"win": 0, "tie": 2, "lose": 0, "failed": 0}  # no markers: 5 and 5
    assert (report["model_a"], report["model_b"]) == (tiny_llama.name, tiny_opt.name)
    for side, model in (("a", tiny_llama), ("b", tiny_opt)):
        engine = load(str(model))
        lines = [json.loads(line) for line in (out / f"answers_{side}.jsonl").read_text().splitlines()]
        assert [l["output"] for l in lines] == [answer(engine, q, sampling=Sampling(5)) for q in ("Say hi.", "Name a colour.")]
        assert [p[f"answer_{side}"] for p in report["pairs"]] == [l["output"] for l in lines]

    partial = answers(tmp_path / "partial.jsonl", [("Say hi.", "hello")])
    capsys.readouterr()
    assert main(["judge", "--test_set", str(test_set), "--answers_a", partial, "--answers_b", partial, "--judge_url",
                 judge.url, "--judge_model", "scripted", "--output_dir", str(tmp_path / "never")]) == 2
    assert "--answers_a: no answer to 'Name a colour.'" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
