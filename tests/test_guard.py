"""What stops a run between steps (training/guard.py). Preemption: a signal makes the run finish its step, save a
complete checkpoint of it on every rank and exit with status 75; the same command then resumes it and ends with the
uninterrupted run's weights. The signal reaches a launcher or a job script (which hand it on), or one rank only (the
ranks agree at the step boundary); a rank killed under torchrun --max-restarts resumes by itself. A non-finite loss
stops the run before the weights take it, or its step is skipped."""

import json
import os
import random
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from instructune.checkpoint import resume
from instructune.cli import main
from instructune.errors import ConfigError
from instructune.training import guard

from conftest import PYTHON, REPO, SRUN, assert_same_tensors, stand_ins
from test_resume import final_state
from test_train import tiny_run_flags

STEPS = 10


def flags(model, output_dir, *extra) -> list[str]:
    """Plain SGD at a constant rate: a resumed run can only match the uninterrupted one if nothing is lost or redone."""
    return [*tiny_run_flags(model, output_dir, steps=STEPS, learning_rate=1e-2), "--optim", "sgd", *extra]


def test_signal_names_are_read_and_checked():
    assert guard.signals_of("TERM,usr1, SIGINT") == [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT]
    assert guard.signals_of("none") == []
    with pytest.raises(ConfigError, match="KILL is not a signal a run can catch"):
        guard.signals_of("TERM,KILL")
    with pytest.raises(ConfigError, match="NOPE is not a signal"):
        guard.signals_of("NOPE")


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    assert main(["train", *flags(tiny_llama, out)]) == 0
    return final_state(out)


def signalled_at(step: int, name: str):
    """A callback that signals this process when `step` begins (as a scheduler would, mid-run)."""
    from transformers import TrainerCallback

    class SignalAt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == step:
                os.kill(os.getpid(), getattr(signal, f"SIG{name}"))

    return SignalAt()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["TERM", "INT"])  # USR1: the Slurm and one-rank tests below
def test_a_signalled_run_saves_its_step_exits_75_and_the_same_command_resumes_it(name, tiny_llama, uninterrupted,
                                                                                  tmp_path, caplog):
    from instructune.cli import run, train

    step = random.Random(name).randint(2, STEPS - 1)
    out = tmp_path / "out"
    command = flags(tiny_llama, out)
    handler = signal.getsignal(getattr(signal, f"SIG{name}"))
    with caplog.at_level("INFO", logger="instructune"):
        code = run(lambda: train.main(command, callbacks=[signalled_at(step, name)]))
    assert code == guard.PREEMPTED == 75
    assert f"preempted at step {step}: checkpoint-{step} saved; rerun the same command to resume" in caplog.text
    assert resume.latest_complete(out).name == f"checkpoint-{step}" and not (out / "train_results.json").exists()
    assert json.loads((out / "preempted.json").read_text())["step"] == step
    assert signal.getsignal(getattr(signal, f"SIG{name}")) == handler  # given back once training ended

    caplog.clear()
    with caplog.at_level("INFO", logger="instructune"):
        assert main(["train", *command]) == 0  # the same command line
    assert f"resuming from {out / f'checkpoint-{step}'}" in caplog.text
    assert not (out / "preempted.json").exists()
    weights, losses = final_state(out)
    expected_weights, expected_losses = uninterrupted
    assert_same_tensors(weights, expected_weights)
    assert losses[step:] == expected_losses[step:]


@pytest.mark.slow
def test_with_save_on_signal_none_the_handlers_are_left_alone(tiny_llama, tmp_path):
    from transformers import TrainerCallback

    seen = []

    class Handlers(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append([signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)])

    before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)]
    from instructune.cli import run, train

    assert run(lambda: train.main(flags(tiny_llama, tmp_path / "none", "--max_steps", "1", "--save_on_signal", "none"),
                                  callbacks=[Handlers()])) == 0
    assert seen == [before]
    assert run(lambda: train.main(flags(tiny_llama, tmp_path / "caught", "--max_steps", "1"), callbacks=[Handlers()])) == 0
    assert all(handler != default for handler, default in zip(seen[1], before))


@pytest.fixture(scope="module")
def uninterrupted_ddp(tiny_llama, ranks, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted-ddp") / "out"
    result = ranks.torchrun("train.py", *flags(tiny_llama, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return final_state(out)


def launched(script: str, signals: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`script ARGS` (a launcher or job script) training with tests/helpers/train_and_signal.py, which sends
    `signals` ("STEP:SIGNAL:rank1|script", ...) when those steps begin; "script" is this script itself."""
    return subprocess.run(["bash", "-c", f'export SCRIPT_PID=$$; exec bash {script} "$@"', "-", *args], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "NNODES": "1",
                               "NPROC_PER_NODE": "2", "PYTHON": PYTHON, "TRAIN_SCRIPT": "tests/helpers/train_and_signal.py",
                               "SIGNALS": signals, **env},
                          capture_output=True, text=True, timeout=600)


def check_resumes_to(out, step, expected, ranks, tiny_llama, tolerance=1e-6):
    """checkpoint-STEP is the newest complete one, and the same command (in the pool) ends with `expected`."""
    assert resume.latest_complete(out).name == f"checkpoint-{step}" and not (out / "train_results.json").exists()
    resumed = ranks.torchrun("train.py", *flags(tiny_llama, out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / f'checkpoint-{step}'}" in resumed.stderr
    weights, losses = final_state(out)
    assert_same_tensors(weights, expected[0], tolerance)
    assert losses[step:] == pytest.approx(expected[1][step:], abs=10 * tolerance)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_killed_rank_restarts_by_itself_then_sigterm_to_the_launcher_saves_and_exits_75(tiny_llama, uninterrupted_ddp,
                                                                                         ranks, tmp_path):
    """scripts/launch_torchrun.sh with MAX_RESTARTS=1, as a run's life on a cluster goes: rank 1 is killed (kill -9)
    at step 4 with checkpoint-3 complete, torchrun restarts both workers and they resume from it by themselves; at a
    later step TERM reaches the script, goes to torchrun, which forwards it to the workers: they save that step and
    the script exits 75; the same command resumes. Every part ends bitwise where the uninterrupted DDP run does."""
    step = random.Random(1).randint(5, STEPS - 1)
    out = tmp_path / "out"
    result = launched("scripts/launch_torchrun.sh", f"4:KILL:rank1,{step}:TERM:script",
                      *flags(tiny_llama, out, "--save_strategy", "steps", "--save_steps", "3", "--save_total_limit", "1"),
                      MASTER_PORT="29811", MAX_RESTARTS="1")
    assert result.returncode == guard.PREEMPTED, result.stderr[-3000:]
    assert "restarted by torchrun (restart 1): resuming from the newest complete checkpoint" in result.stderr
    assert f"resuming from {out / 'checkpoint-3'}" in result.stderr
    assert f"preempted at step {step}: checkpoint-{step} saved; rerun the same command to resume" in result.stderr
    assert [p.name for p in resume.checkpoints(out)] == [f"checkpoint-{step}"]  # --save_total_limit 1
    check_resumes_to(out, step, uninterrupted_ddp, ranks, tiny_llama, tolerance=0.0)  # DDP on the CPU: bitwise


@pytest.mark.slow
@pytest.mark.distributed
def test_slurm_usr1_saves_exits_75_and_requeues(tiny_llama, uninterrupted_ddp, ranks, tmp_path):
    """scripts/train.slurm as sbatch runs it, on a one-node allocation of 2 processes (stand-ins for srun, scontrol and
    scancel on PATH: Slurm itself does not run here): it trains, USR1 to the batch script reaches the workers through
    every node's launcher, the job is requeued, and the same command ends with the uninterrupted DDP run's model."""
    calls = tmp_path / "scontrol.calls"
    path = stand_ins(tmp_path / "bin", scontrol=f'echo "$@" >> {calls}; echo 127.0.0.1', srun=SRUN,
                     scancel="pkill -USR1 -f scripts/launch_torchrun.sh")  # --signal=USR1: to the job's steps
    step = random.Random(2).randint(2, STEPS - 1)
    out = tmp_path / "out"
    result = launched("scripts/train.slurm", f"{step}:USR1:script", *flags(tiny_llama, out), PATH=path,
                      SLURM_NNODES="1", SLURM_JOB_ID="42", SLURM_JOB_NODELIST="node-1", GPUS_PER_NODE="2",
                      MASTER_PORT="29821")
    assert result.returncode == guard.PREEMPTED, result.stderr[-3000:]
    assert f"preempted at step {step}: checkpoint-{step} saved" in result.stderr
    assert calls.read_text().splitlines()[-1] == "requeue 42"
    check_resumes_to(out, step, uninterrupted_ddp, ranks, tiny_llama)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_signal_to_one_rank_only_stops_both_at_the_same_step(tiny_llama, uninterrupted_ddp, ranks, tmp_path):
    step = random.Random(3).randint(2, STEPS - 1)
    out = tmp_path / "out"
    result = ranks.torchrun("tests/helpers/train_and_signal.py", *flags(tiny_llama, out), SIGNALS=f"{step}:USR1:rank1")
    assert result.returncode == guard.PREEMPTED, result.stderr[-3000:]
    assert f"preempted at step {step}: checkpoint-{step} saved" in result.stderr
    check_resumes_to(out, step, uninterrupted_ddp, ranks, tiny_llama)


def nan_at(step: int, watched: list):
    """A callback that makes the loss of `step` NaN (the LM head's output), and records the weights around it."""
    from transformers import TrainerCallback

    class NanAt(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.poisoned = False
            model.get_output_embeddings().register_forward_hook(lambda m, i, o: o * float("nan") if self.poisoned else o)

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.poisoned = state.global_step + 1 == step
            if self.poisoned:
                watched.append({k: v.clone() for k, v in model.state_dict().items()})

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if self.poisoned:
                watched.append({k: v.clone() for k, v in model.state_dict().items()})
            self.poisoned = False

    return NanAt()


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_before_the_weights_take_it(tiny_llama, tmp_path, capsys):
    from instructune.cli import run, train

    out = tmp_path / "out"
    command = flags(tiny_llama, out, "--optim", "adamw_torch", "--save_strategy", "steps", "--save_steps", "2")
    assert run(lambda: train.main(command, callbacks=[nan_at(5, [])])) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: step 5: the loss is not finite (NaN or infinite); stopped before the weights took it. Newest complete "
        f"checkpoint: {out / 'checkpoint-4'}; lower the learning rate, or pass --skip_nonfinite_steps K to skip up to K "
        "such steps")
    assert [p.name for p in resume.checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "train_results.json").exists() and not list(out.glob("model*.safetensors"))


@pytest.mark.slow
def test_skipped_nonfinite_steps_leave_the_weights_alone_and_are_counted(tiny_llama, tmp_path, caplog):
    from instructune.cli import run, train

    out = tmp_path / "out"
    around = []
    command = flags(tiny_llama, out, "--optim", "adamw_torch", "--skip_nonfinite_steps", "1")
    with caplog.at_level("WARNING", logger="instructune"):
        assert run(lambda: train.main(command, callbacks=[nan_at(3, around)])) == 0
    assert "step 3: the loss is not finite; step skipped (1 of --skip_nonfinite_steps 1)" in caplog.text
    before, after = around
    assert_same_tensors(after, before)  # the skipped step changed nothing
    summary = json.loads((out / "train_results.json").read_text())
    assert summary["metrics"]["skipped_nonfinite_steps"] == [3]
    weights, _ = final_state(out)
    assert all(bool(w.isfinite().all()) for w in weights.values())
    assert not all(torch.equal(weights[k], before[k]) for k in before)  # the other steps trained


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("extra", [["--strategy", "fsdp"], ["--lora_r", "8"]], ids=["fsdp", "lora"])
def test_sharded_strategies_and_adapters_resume_a_preemption(extra, tiny_llama, ranks, tmp_path):
    """The preemption checkpoint is the Trainer's own, so it holds under FSDP (partitioned weights and optimizer; ZeRO's
    checkpoints resume exactly in test_resume.py) and for LoRA adapters: stopped at one step by a signal to one rank,
    resumed within 1e-6 (AdamW)."""
    def run_flags(out):
        return [*tiny_run_flags(tiny_llama, out, steps=STEPS, learning_rate=1e-3), *extra]

    def weights_of(out):
        adapter = out / "adapter_model.safetensors"
        return load_file(adapter) if adapter.exists() else final_state(out)[0]

    reference = ranks.torchrun("train.py", *run_flags(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "out"
    stopped = ranks.torchrun("tests/helpers/train_and_signal.py", *run_flags(out), SIGNALS="4:TERM:rank1")
    assert stopped.returncode == guard.PREEMPTED, stopped.stderr[-3000:]
    assert resume.latest_complete(out).name == "checkpoint-4" and not (out / "train_results.json").exists()
    resumed = ranks.torchrun("train.py", *run_flags(out))
    assert resumed.returncode == 0 and f"resuming from {out / 'checkpoint-4'}" in resumed.stderr, resumed.stderr[-3000:]
    assert_same_tensors(weights_of(out), weights_of(tmp_path / "reference"), 1e-6)
