"""`instructune eval` and `--eval_tasks` with lm-eval on local task YAMLs (the hub is unreachable here): the accuracy
of a multiple-choice task and the exact match of a generation task are what a hand computation with the model gives,
and the figure logged during training (on the main process of a DDP run) is the saved model's."""

import json

import pytest
import torch

from instructune.cli import main

from conftest import MC_QUESTIONS as QUESTIONS, SAMPLE_DATA, write_mc_task

pytestmark = pytest.mark.slow

GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """As lm-eval defines it: encode context and context+continuation (the tokenizer's own BOS), score the rest."""
    context_ids, whole = tokenizer.encode(context), tokenizer.encode(context + continuation)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole)))


def greedy(model, tokenizer, context: str, tokens: int) -> str:
    ids = torch.tensor([tokenizer.encode(context)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]


@pytest.fixture
def tasks(tmp_path, tiny_llama):
    """The two task YAMLs, and the figures a hand computation expects of the tiny model: for the generation task, the
    first half of the targets are the model's own greedy answers, the rest answers it never gives."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    right = [max(range(3), key=lambda k: loglikelihood(model, tokenizer, f"Question: {q}\nAnswer:", f" {c[k]}")) == a
             for q, c, a in QUESTIONS]
    targets = [greedy(model, tokenizer, f"Q: {q}\nA:", 6) if i < 4 else "never this answer" for i, (q, _, _) in enumerate(QUESTIONS)]
    (tmp_path / "gen.jsonl").write_text("\n".join(json.dumps({"question": q, "target": t}) for (q, _, _), t in zip(QUESTIONS, targets)))
    folder = write_mc_task(tmp_path / "tasks", "tiny_mc")
    (folder / "tiny_gen.yaml").write_text(GEN_YAML.format(data=tmp_path / "gen.jsonl"))
    return folder, sum(right) / len(right), 0.5


def test_eval_command_gives_the_hand_computed_figures(tiny_llama, tasks, tmp_path, capsys):
    folder, expected_acc, expected_match = tasks
    output = tmp_path / "results"
    assert main(["eval", "--model", str(tiny_llama), "--tasks", "tiny_mc,tiny_gen", "--include_path", str(folder),
                 "--output_dir", str(output)]) == 0
    results = json.loads((output / "results.json").read_text())["results"]
    assert results["tiny_mc"]["acc,none"] == pytest.approx(expected_acc)
    assert results["tiny_gen"]["exact_match,none"] == pytest.approx(expected_match)
    assert "tiny_mc" in (output / "results.md").read_text() and "|" in capsys.readouterr().out
    assert len((output / "samples_tiny_mc.jsonl").read_text().splitlines()) == len(QUESTIONS)

    assert main(["eval", "--model", str(tiny_llama), "--tasks", "no_such_task", "--include_path", str(folder),
                 "--output_dir", str(tmp_path / "never")]) == 2
    assert "unknown lm-eval task no_such_task" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


@pytest.mark.distributed
def test_eval_tasks_under_ddp_run_on_the_main_process_and_zero3_is_refused(tiny_llama, tasks, ranks, tmp_path):
    folder, _, _ = tasks
    flags = ["--model_name_or_path", str(tiny_llama), "--data_path", str(SAMPLE_DATA), "--max_steps", "4",
             "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--model_max_length", "128",
             "--save_strategy", "no", "--report_to", "none", "--eval_tasks", "tiny_mc", "--eval_tasks_steps", "2",
             "--eval_tasks_include_path", str(folder)]
    trained = ranks.torchrun("train.py", *flags, "--output_dir", str(tmp_path / "ddp"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "train_results.json").read_text())
    assert summary["strategy"] == "ddp" and [e["step"] for e in summary["lm_eval"]] == [2, 4]
    assert main(["eval", "--model", str(tmp_path / "ddp"), "--tasks", "tiny_mc", "--include_path", str(folder),
                 "--output_dir", str(tmp_path / "after")]) == 0
    after = json.loads((tmp_path / "after" / "results.json").read_text())["results"]["tiny_mc"]["acc,none"]
    assert summary["lm_eval"][-1]["lm_eval/tiny_mc/acc"] == pytest.approx(after)

    refused = ranks.torchrun("train.py", *flags, "--output_dir", str(tmp_path / "zero3"), "--strategy", "zero3")
    assert refused.returncode != 0 and "error: --eval_tasks runs on the main process's copy of the model" in refused.stderr
    assert not (tmp_path / "zero3").exists()
