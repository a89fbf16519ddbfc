"""A checkpoint is complete only if this run completed it (#9 §2), and no code runs from a checkpoint file
(#9 §3): crafted pickles are refused in one line, half-written checkpoints are named, not tracebacks."""

import json
import os
import pickle
import subprocess

import pytest
import torch

from instructune.checkpoint import resume
from instructune.cli import main

from conftest import PYTHON, REPO
from test_train import tiny_run_flags


def flags(model, out, steps, *extra):
    return [*tiny_run_flags(model, out, steps=steps), "--save_strategy", "steps", "--save_steps", "1", *extra]


@pytest.mark.slow
def test_a_rewritten_checkpoint_killed_midway_is_not_complete(tiny_llama, tmp_path, capsys):
    """Seen: run 2 killed while rewriting run 1's complete checkpoint-2 kept the old marker, and 'auto' resumed a
    folder mixing new weights with the old optimizer state."""
    out = tmp_path / "out"
    assert main(["train", *flags(tiny_llama, out, 2)]) == 0
    assert [resume.is_complete(p) for p in resume.checkpoints(out)] == [True, True]
    killed = subprocess.run(
        [PYTHON, "tests/helpers/train_and_kill.py", *flags(tiny_llama, out, 2, "--learning_rate", "1e-2",
                                                            "--resume_from_checkpoint", str(out / "checkpoint-1"))],
        cwd=REPO, env={**os.environ, "KILL_AT_STEP": "2", "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, start_new_session=True, timeout=300)
    assert killed.returncode != 0
    assert not resume.is_complete(out / "checkpoint-2") and resume.latest_complete(out) == out / "checkpoint-1"
    assert main(["train", *flags(tiny_llama, out, 2, "--resume_from_checkpoint", str(out / "checkpoint-2"))]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --resume_from_checkpoint {out / 'checkpoint-2'}: incomplete checkpoint (a run stopped while saving "
        "it); pass an earlier one or 'auto'")


def test_the_marker_records_step_and_run(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    resume.mark_complete(tmp_path / "checkpoint-3", 3, "run-a")
    record = json.loads((tmp_path / "checkpoint-3" / resume.COMPLETE_MARKER).read_text())
    assert record["step"] == 3 and record["run_id"] == "run-a" and record["completed_at"] > 0
    assert [p.name for p in (tmp_path / "checkpoint-3").iterdir()] == [resume.COMPLETE_MARKER]  # no staging left
    (tmp_path / "checkpoint-3" / resume.COMPLETE_MARKER).write_text("complete\n")  # not a marker of ours
    assert not resume.is_complete(tmp_path / "checkpoint-3")
    (tmp_path / "checkpoint-5").mkdir()
    resume.mark_complete(tmp_path / "checkpoint-5", 4, "run-a")  # a marker for another step: not this folder's
    assert not resume.is_complete(tmp_path / "checkpoint-5")


def test_rotation_follows_the_runs_history_not_step_numbers(tmp_path):
    """Seen: run 2 (resumed from checkpoint-2, --save_total_limit 1) saved checkpoint-3; rotation by step number kept
    run 1's checkpoint-4 and deleted run 2's newest complete checkpoint."""
    for step in (2, 4, 3):  # run 1 completed 2 and 4; run 2, resumed from 2, completed 3 afterwards
        (tmp_path / f"checkpoint-{step}").mkdir()
        resume.mark_complete(tmp_path / f"checkpoint-{step}", step, f"run-{1 if step != 3 else 2}")
    assert resume.latest_complete(tmp_path) == tmp_path / "checkpoint-3"
    resume.rotate(tmp_path, keep=1)
    assert [p.name for p in resume.checkpoints(tmp_path)] == ["checkpoint-3"]


def test_a_rotation_killed_midway_leaves_no_complete_looking_folder(tmp_path, monkeypatch):
    """Seen: a run killed while rotation deleted an old checkpoint left it with its marker and 8 of its 11 files."""
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
            (tmp_path / f"checkpoint-{step}" / name).write_text("x")
        resume.mark_complete(tmp_path / f"checkpoint-{step}", step, "run-a")

    def killed_while_deleting(folder, ignore_errors=False):
        (folder / "optimizer.pt").unlink()
        raise SystemExit("killed")

    monkeypatch.setattr(resume.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(SystemExit):
        resume.rotate(tmp_path, keep=1)
    assert not resume.is_complete(tmp_path / "checkpoint-2") and resume.latest_complete(tmp_path) == tmp_path / "checkpoint-4"


@pytest.mark.slow
@pytest.mark.parametrize("lost", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_a_checkpoint_without_its_training_state_is_not_resumed(lost, tiny_llama, tmp_path, capsys):
    """Seen: a marked checkpoint without optimizer.pt resumed silently with a fresh optimizer (1e-4 off)."""
    out = tmp_path / "out"
    assert main(["train", *flags(tiny_llama, out, 1)]) == 0
    (out / "checkpoint-1" / lost).unlink()
    capsys.readouterr()
    for resumed in (str(out / "checkpoint-1"), "auto"):
        assert main(["train", *flags(tiny_llama, out, 2, "--resume_from_checkpoint", resumed)]) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith(f"error: --resume_from_checkpoint {out / 'checkpoint-1'}: no ") and lost in error
    assert not (out / "checkpoint-2").exists()


def test_a_missing_checkpoint_is_one_line(tiny_llama, tmp_path, capsys):
    assert main(["train", *flags(tiny_llama, tmp_path / "out", 1, "--resume_from_checkpoint", str(tmp_path / "nope"))]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --resume_from_checkpoint {tmp_path / 'nope'}: no such checkpoint folder")
    assert not (tmp_path / "out").exists()


class RunsCode:
    """Unpickling this makes a folder: the stand-in for any code a crafted checkpoint could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def crafted_zero_checkpoint(folder, witness):
    (folder / "global_step1").mkdir(parents=True)
    (folder / "latest").write_text("global_step1")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"module": {"w": torch.zeros(2)}, "hook": RunsCode(witness)}, folder / "global_step1" / name)
    return folder


def convert(capsys, source, destination, *extra) -> tuple[int, str]:
    """`instructune convert` in this process: (exit status, its last line on stderr)."""
    code = main(["convert", str(source), str(destination), *extra])
    return code, capsys.readouterr().err.strip().splitlines()[-1]


def test_a_crafted_zero_checkpoint_runs_no_code(tmp_path, capsys):
    witness = tmp_path / "code-ran"
    checkpoint = crafted_zero_checkpoint(tmp_path / "checkpoint-1", witness)
    code, error = convert(capsys, checkpoint, tmp_path / "hf")
    assert code == 2 and error.startswith(f"error: {checkpoint / 'global_step1'}/")
    assert "_states.pt: holds objects other than plain weights" in error and "--trust_checkpoint" in error
    assert not witness.exists() and not (tmp_path / "hf").exists()
    code, _ = convert(capsys, checkpoint, tmp_path / "hf", "--trust_checkpoint")  # the user's call: the check is lifted
    assert witness.exists() and code == 2


def test_a_crafted_fsdp_metadata_runs_no_code(tmp_path, capsys):
    witness = tmp_path / "code-ran"
    shards = tmp_path / "checkpoint-1" / "pytorch_model_fsdp_0"
    shards.mkdir(parents=True)
    (shards.parent / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (shards / ".metadata").write_bytes(pickle.dumps(RunsCode(witness), protocol=4))
    code, error = convert(capsys, shards.parent, tmp_path / "hf")
    assert code == 2 and not witness.exists()
    assert error.startswith(f"error: {shards / '.metadata'}: holds objects other than plain weights (names posix.mkdir)")


@pytest.mark.parametrize("damage", ["latest_names_a_missing_step", "no_optimizer_states", "truncated_states",
                                    "truncated_fsdp_metadata"])
def test_half_written_checkpoints_are_one_line(damage, tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint-1"
    step = checkpoint / "global_step1"
    step.mkdir(parents=True)
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (checkpoint / "latest").write_text("global_step1")
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"module": {}}, step / name)
    expected = {
        "latest_names_a_missing_step": f"{checkpoint / 'latest'}: names global_step2, which is missing",
        "no_optimizer_states": f"{step}: no *optim_states.pt file: the checkpoint is incomplete",
        "truncated_states": f"{checkpoint}: incomplete or damaged checkpoint",
        "truncated_fsdp_metadata": f"{tmp_path / 'fsdp' / 'pytorch_model_fsdp_0' / '.metadata'}: truncated",
    }[damage]
    if damage == "latest_names_a_missing_step":
        (checkpoint / "latest").write_text("global_step2")
    elif damage == "no_optimizer_states":
        (step / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    elif damage == "truncated_states":
        data = (step / "zero_pp_rank_0_mp_rank_00_optim_states.pt").read_bytes()
        (step / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(data[: len(data) // 2])
    else:
        checkpoint = tmp_path / "fsdp"
        (checkpoint / "pytorch_model_fsdp_0").mkdir(parents=True)
        (checkpoint / "config.json").write_text("{}")
        (checkpoint / "pytorch_model_fsdp_0" / ".metadata").write_bytes(pickle.dumps({"a": 1}, protocol=4)[:-3])
    code, error = convert(capsys, checkpoint, tmp_path / "hf")
    assert code == 2 and error.startswith(f"error: {expected}")
    assert not (tmp_path / "hf").exists()
