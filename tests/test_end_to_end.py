"""End to end with the real built-in model (SmolLM2-135M-Instruct) and real Alpaca data."""

import json
import re

import pytest
from transformers import AutoModelForCausalLM

from instructune.cli import main
from instructune.inference.answers import answer
from instructune.inference.engine import Sampling, load

from conftest import REPO, SCRIPTS, SHARED_DATA, run_command

pytestmark = pytest.mark.slow


def test_builtin_model_folder_is_plain_hugging_face(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_fine_tune_smollm2_on_real_alpaca_records(smollm2, tmp_path, capsys):
    """In-process (the demo test below launches the command): train on 8 real records, then generate."""
    source = SHARED_DATA / "random_9k.json"
    if not source.exists():
        pytest.skip(f"real Alpaca data not found at {source} (see the developers' guide)")
    records = json.loads(source.read_text())[:8]
    data = tmp_path / "alpaca_8.json"
    data.write_text(json.dumps(records))
    output_dir = tmp_path / "smollm2-tuned"
    assert main(["train", "--config", str(REPO / "configs" / "smollm2-135m-cpu.yaml"), "--data_path", str(data),
                 "--output_dir", str(output_dir), "--max_steps", "4", "--per_device_train_batch_size", "4",
                 "--learning_rate", "1e-4", "--model_max_length", "64", "--disable_tqdm", "True",
                 "--max_shard_size", "200MB", "--val_set_size", "0"]) == 0
    summary = json.loads((output_dir / "train_results.json").read_text())
    losses = [e["loss"] for e in summary["losses"]]
    assert len(losses) == 4 and sum(losses[2:]) < sum(losses[:2]), losses  # epoch 2 fits the same records better
    assert len(json.loads((output_dir / "model.safetensors.index.json").read_text())["weight_map"]) == 272

    question = "Name three primary colours."
    capsys.readouterr()
    assert main(["generate", "--model_name_or_path", str(output_dir), "--instruction", question, "--max_new_tokens", "16"]) == 0
    # the command answers with the fine-tuned weights (not the base model's), through Alpaca's template
    sixteen = Sampling(max_new_tokens=16)
    tuned, base = answer(load(str(output_dir)), question, sampling=sixteen), answer(load(str(smollm2)), question, sampling=sixteen)
    assert capsys.readouterr().out.strip() == tuned != base


def test_demo_command(tmp_path):
    """The README's first command (shortened), run outside the checkout: the held-out loss falls, answers before
    and after, a model folder."""
    command = str(SCRIPTS / "instructune")
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "old-run.txt").write_text("the demo config overwrites its own output folder")
    result = run_command([command, "demo", "--max_steps", "2", "--output_dir", "demo"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "demo" / "old-run.txt").exists()
    out = result.stdout
    assert out.index("=== before fine-tuning") < out.index("=== after fine-tuning") < out.index("held-out loss")
    assert out.count("Q: What is the capital of Spain?") == 2
    heldout = re.search(r"held-out loss \(16 records never trained on\): ([\d.]+) → ([\d.]+) \(fell\)", out)
    assert heldout and float(heldout[2]) < float(heldout[1]) - 0.05, out[-500:]
    summary = json.loads((tmp_path / "demo" / "train_results.json").read_text())
    assert [e["loss"] for e in summary["heldout_losses"]] == pytest.approx([float(heldout[1]), float(heldout[2])], abs=1e-3)
    assert summary["data"]["heldout"] == 16 and summary["data"]["kept"] == 125
    assert (tmp_path / "demo" / "config.json").exists() and (tmp_path / "demo" / "loss_curve.png").exists()
