"""An output folder never holds two runs (#9 §1): a folder with another run's files is refused, overwriting
empties it first, and a resumed run's final model replaces the earlier weights instead of landing beside them."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from instructune.checkpoint.tensorio import TensorFolder
from instructune.cli import main

from conftest import PYTHON, SAMPLE_DATA, assert_same_tensors, run_command
from test_train import tiny_run_flags


def train(model, output_dir, *extra) -> int:
    return main(["train", *tiny_run_flags(model, output_dir, steps=2), *extra])


def both_readers_agree(output_dir) -> dict:
    """transformers' loader and instructune's own reader see the same weights (no stale file wins for either)."""
    reader = TensorFolder(output_dir)
    ours = {name: reader.get(name) for name in reader.names()}
    loaded = AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32).state_dict()
    assert_same_tensors({name: loaded[name] for name in ours}, ours)
    return ours


def test_a_folder_holding_files_is_refused(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"  # as an earlier run left it
    shutil.copytree(tiny_llama, out)
    (out / "train_results.json").write_text("{}")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert train(tiny_llama, out, "--learning_rate", "1e-2") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: {out}: already holds files (") and "--overwrite_output_dir True" in error
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # untouched


@pytest.mark.slow  # trains (the fast tier trains nothing)
def test_overwrite_replaces_a_single_file_model_with_shards(tiny_llama, tmp_path):
    """Seen: run 1's model.safetensors stayed beside run 2's shards; from_pretrained loaded run 1's weights."""
    out = tmp_path / "out"
    assert train(tiny_llama, out, "--max_shard_size", "5GB") == 0
    (out / "notes.txt").write_text("from run 1")
    first = both_readers_agree(out)
    assert train(tiny_llama, out, "--overwrite_output_dir", "True", "--learning_rate", "1e-2") == 0
    assert not (out / "model.safetensors").exists() and not (out / "notes.txt").exists()
    assert (out / "model.safetensors.index.json").exists()
    second = both_readers_agree(out)
    assert not torch.equal(second["model.norm.weight"], first["model.norm.weight"])  # really run 2's weights


@pytest.mark.slow  # trains (the fast tier trains nothing)
def test_resumed_run_replaces_the_earlier_final_model(tiny_llama, tmp_path):
    out = tmp_path / "out"
    assert train(tiny_llama, out, "--max_shard_size", "5GB", "--save_strategy", "steps", "--save_steps", "2") == 0
    assert (out / "model.safetensors").exists()
    resumed = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--resume_from_checkpoint", "auto"]
    assert train(tiny_llama, out, *resumed) == 0
    assert not (out / "model.safetensors").exists() and not (out / ".final-model.partial").exists()
    both_readers_agree(out)
    assert [e["step"] for e in json.loads((out / "train_results.json").read_text())["losses"]] == [1, 2, 3, 4]


def test_the_base_model_folder_is_refused(tiny_llama, capsys):
    files = sorted(p.name for p in tiny_llama.iterdir())
    assert main(["train", *tiny_run_flags(tiny_llama, tiny_llama, steps=1), "--overwrite_output_dir", "True"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {tiny_llama}: is the base model's folder; choose another --output_dir"
    assert sorted(p.name for p in tiny_llama.iterdir()) == files


@pytest.mark.slow  # a launched process
def test_a_full_disk_at_the_final_save_is_one_line(tiny_llama, tmp_path):
    out = tmp_path / "out"
    flags = " ".join(tiny_run_flags(tiny_llama, out, steps=1)).replace("200KB", "5GB")  # one file, over the limit
    result = run_command(["bash", "-c", f'ulimit -f 300; exec "$0" train.py {flags}', PYTHON])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: no space left while writing {out}; the model was not saved (complete checkpoints are intact)")
    assert not list(out.glob("model*")) and not (out / ".final-model.partial").exists()


def test_an_output_folder_holding_or_inside_an_input_is_refused(tiny_llama, tmp_path, capsys):
    """Seen (#20 §5): --overwrite_output_dir with the base model and the data inside the output folder deleted both."""
    out = tmp_path / "p"
    shutil.copytree(tiny_llama, out / "base")
    shutil.copy(SAMPLE_DATA, out / "data.json")
    (out / "run.yaml").write_text("learning_rate: 0.001\n")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    def refused(model, output_dir, expected, *extra):
        flags = tiny_run_flags(model, output_dir, steps=1)
        assert main(["train", *flags, "--overwrite_output_dir", "True", *extra]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {expected}; choose another --output_dir"
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # nothing deleted

    refused(out / "base", out, f"{out}: holds the base model ({out / 'base'})")
    refused(tiny_llama, out, f"{out}: holds the data ({out / 'data.json'})", "--data_path", str(out / "data.json"))
    refused(tiny_llama, out, f"{out}: holds the config file ({out / 'run.yaml'})", "--config", str(out / "run.yaml"))
    refused(out / "base", out / "base" / "run", f"{out / 'base' / 'run'}: lies inside the base model ({out / 'base'})")
