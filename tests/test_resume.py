"""Crash-safe checkpoints: a job killed with SIGKILL in the middle of saving a checkpoint resumes with
`--resume_from_checkpoint auto` from the one before and ends with the weights and losses of an uninterrupted run.
(A rank killed right after a checkpoint, resumed by torchrun --max-restarts: test_guard.py.)"""

import json
import os
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM

from instructune.checkpoint import resume

from conftest import PYTHON, REPO, assert_same_tensors
from test_train import tiny_run_flags


def make_checkpoints(root, steps_complete, steps_incomplete):
    """Checkpoint folders; the complete ones are completed in the order given."""
    for step in steps_complete + steps_incomplete:
        (root / f"checkpoint-{step}").mkdir(parents=True)
    for step in steps_complete:
        resume.mark_complete(root / f"checkpoint-{step}", step, "run-a")


def test_latest_complete_skips_incomplete_checkpoints(tmp_path, caplog):
    caplog.set_level("INFO", logger="instructune")
    make_checkpoints(tmp_path, [4, 8], [12])
    assert resume.latest_complete(tmp_path) == tmp_path / "checkpoint-8"
    assert "skipping" in caplog.text and "checkpoint-12" in caplog.text
    assert resume.latest_complete(tmp_path / "missing") is None


def test_rotation_never_deletes_the_last_good_checkpoint(tmp_path):
    make_checkpoints(tmp_path, [4, 8], [12])
    resume.rotate(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-8"]  # the incomplete leftover goes too
    make_checkpoints(tmp_path / "b", [4, 12], [8])
    resume.rotate(tmp_path / "b", keep=1, protect=str(tmp_path / "b" / "checkpoint-4"))
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoint-12", "checkpoint-4"]


STEPS, SAVE_EVERY = 12, 4


def flags(model, output_dir, *extra):
    return [*tiny_run_flags(model, output_dir, steps=STEPS, learning_rate=1e-3), "--save_strategy", "steps",
            "--save_steps", str(SAVE_EVERY), "--save_total_limit", "1", *extra]


def launch(script, args, port, **env):
    command = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), script, *args]
    return subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=600, start_new_session=True)


def final_state(output_dir):
    model = AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32)
    losses = [e["loss"] for e in json.loads((output_dir / "train_results.json").read_text())["losses"]]
    return model.state_dict(), losses


_uninterrupted = {}


def uninterrupted_run(strategy, model, tmp_path, ranks):
    """The reference run of a strategy, made once (both DDP cases compare with the same one)."""
    if strategy not in _uninterrupted:
        reference = ranks.torchrun("train.py", *flags(model, tmp_path / "reference", "--strategy", strategy))
        assert reference.returncode == 0, reference.stderr[-3000:]
        _uninterrupted[strategy] = tmp_path / "reference"
    return _uninterrupted[strategy]


@pytest.mark.slow
@pytest.mark.distributed
# ZeRO-2 and ZeRO-3 with offload write their checkpoints through the same DeepSpeed engine calls as ZeRO-3 (partitioned
# optimizer states, in CPU memory while training for offload), and FSDP's checkpoint resumes exactly in test_guard.py
# (a half-written checkpoint is skipped by the same completion marker under every strategy): they are not run apart
# here, to keep the suite under 10 minutes.
@pytest.mark.parametrize("strategy, tolerance", [("ddp", 0.0), ("zero3", 1e-6)])
def test_job_killed_while_saving_resumes_to_the_same_result(strategy, tolerance, tiny_llama, ranks, tmp_path):
    """The killed job is a real torchrun job (SIGKILL to its process group); the reference and the resumed run are
    jobs of the pooled ranks."""
    port = 29700 + 10 * ["ddp", "zero3"].index(strategy)
    extra = ["--strategy", strategy]
    reference_dir = uninterrupted_run(strategy, tiny_llama, tmp_path, ranks)

    out = tmp_path / "interrupted"
    killed = launch("tests/helpers/train_and_kill.py", flags(tiny_llama, out, *extra), port + 1, KILL_AT_STEP="8")
    assert killed.returncode != 0 and not (out / "train_results.json").exists()
    expected_resume = "checkpoint-4"
    assert resume.latest_complete(out).name == expected_resume
    # the half-written checkpoint is there, unmarked
    assert (out / "checkpoint-8").exists() and not resume.is_complete(out / "checkpoint-8")

    resumed = ranks.torchrun("train.py", *flags(tiny_llama, out, *extra, "--resume_from_checkpoint", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / expected_resume}" in resumed.stderr and "skipping" in resumed.stderr

    expected_weights, expected_losses = final_state(reference_dir)
    weights, losses = final_state(out)
    assert_same_tensors(weights, expected_weights, tolerance)
    resumed_from = int(expected_resume.split("-")[1])
    assert losses[resumed_from:] == pytest.approx(expected_losses[resumed_from:], abs=tolerance * 10)
    assert [p.name for p in resume.checkpoints(out)] == [f"checkpoint-{STEPS}"]  # save_total_limit 1
