"""What may stop a run between two steps: a signal (preemption), or a loss that is not finite.

Preemption. Clusters end jobs with a signal and a grace time (Slurm: SIGTERM, or SIGUSR1 ahead of time
with `--signal`; torchrun forwards SIGTERM and SIGINT to its workers and kills them 30 s later). On one
of `--save_on_signal` (TERM, USR1, INT by default) a process only notes it; at the end of the optimizer
step in progress the ranks agree (the signal may reach only some of them), save a complete checkpoint
of that step (its marker last, as every checkpoint), leave a note in the output folder, and exit with
PREEMPTED. The same command then resumes: the note, or a restart by torchrun's elastic agent, turns
`--resume_from_checkpoint auto` on (`resume_flag`).

Non-finite loss. The Trainer trains on after a NaN or infinite loss (it only keeps it out of the logged
average), and the weights become NaN. Here the step stops the run before its optimizer step (DeepSpeed
steps inside the backward pass: there, before anything is saved), naming the step and the newest
complete checkpoint; with `--skip_nonfinite_steps K`, up to K such steps are skipped (their gradients
dropped, so the optimizer leaves every weight as it was) and counted in the run summary.

Both are decided at the optimizer step with one all-reduce of two flags, so every rank does the same.
"""

import json
import logging
import os
import signal
from pathlib import Path

import torch
from transformers import TrainerCallback

from instructune.checkpoint import resume
from instructune.errors import ConfigError, UserError
from instructune.files import atomic_file

logger = logging.getLogger("instructune")

PREEMPTED = 75  # the exit status of a preempted run (EX_TEMPFAIL: try again later); anything else non-zero failed
NOTE = "preempted.json"  # in output_dir, from the preemption's checkpoint until a run of that folder completes
# Set by scripts/launch_torchrun.sh: torchrun reports workers that exit 75 as failed (and exits 1), so each node's
# first process also leaves the note there, and the script exits 75.
LAUNCHER_NOTE = "INSTRUCTUNE_PREEMPTED_FILE"


def signals_of(names: str) -> list[signal.Signals]:
    """'TERM,USR1,INT' → the signals; '' or 'none' → none. An unknown name is a one-line error."""
    chosen = []
    for name in (n.strip().upper().removeprefix("SIG") for n in names.split(",")):
        if name in ("", "NONE"):
            continue
        if not hasattr(signal, f"SIG{name}") or name in ("KILL", "STOP"):
            raise ConfigError(f"--save_on_signal {names}: {name} is not a signal a run can catch (e.g. TERM,USR1,INT)")
        chosen.append(getattr(signal, f"SIG{name}"))
    return chosen


def resume_flag(args) -> str | None:
    """--resume_from_checkpoint as given, or 'auto' when the output folder holds a preempted run's note or torchrun's
    elastic agent restarted this process: the same command line continues the run."""
    if args.resume_from_checkpoint:
        return args.resume_from_checkpoint
    note = Path(args.output_dir) / NOTE
    if note.exists():
        logger.info("%s: a preempted run; resuming it (--resume_from_checkpoint auto)", note)
        return "auto"
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        logger.info("restarted by torchrun (restart %s): resuming from the newest complete checkpoint",
                    os.environ["TORCHELASTIC_RESTART_COUNT"])
        return "auto"
    return None


def clear_note(output_dir: str | Path) -> None:
    """The run of this folder completed: a later run is a new one."""
    (Path(output_dir) / NOTE).unlink(missing_ok=True)


class StepGuard(TrainerCallback):
    """Catches `signals` while training and watches the loss (the trainer calls `loss`); at each optimizer step the
    ranks agree on both. `stopped_at`: the step a signal stopped the run at; `skipped`: the steps skipped."""

    def __init__(self, signals: list[signal.Signals], skip_nonfinite: int, device: torch.device):
        self.signals, self.skip_nonfinite, self.device = signals, skip_nonfinite, device
        self.received: signal.Signals | None = None
        self.nonfinite = False  # in this step's micro-batches, on this rank
        self.stop_requested = False  # agreed by every rank
        self.stopped_at: int | None = None
        self.skipped: list[int] = []
        self.previous = {}

    # -- the trainer's and the signals' side: note only
    def loss(self, value: torch.Tensor) -> None:
        if not torch.isfinite(value).all():
            self.nonfinite = True

    def note(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            logger.warning("%s received: saving a checkpoint when the step in progress ends", self.received.name)
        else:  # a checkpoint in progress is finished, or stays unmarked (incomplete) if the process is killed
            logger.warning("%s received again: already stopping", signal.Signals(signum).name)

    # -- the step boundary: decide, every rank alike
    def on_train_begin(self, args, state, control, **kwargs):
        for s in self.signals:
            self.previous[s] = signal.signal(s, self.note)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        received, nonfinite = self.agree(self.received is not None, self.nonfinite)
        self.nonfinite = False
        self.stop_requested |= received
        if not nonfinite:
            return
        step = state.global_step + 1
        if len(self.skipped) < self.skip_nonfinite:
            for parameter in model.parameters():  # no gradient: the optimizer leaves the weight and its state alone
                parameter.grad = None
            self.skipped.append(step)
            logger.warning("step %d: the loss is not finite; step skipped (%d of --skip_nonfinite_steps %d)", step,
                           len(self.skipped), self.skip_nonfinite)
            return
        newest = resume.latest_complete(args.output_dir)
        raise UserError(f"step {step}: the loss is not finite (NaN or infinite); stopped before the weights took it. "
                        f"Newest complete checkpoint: {newest or 'none'}; lower the learning rate, or pass "
                        "--skip_nonfinite_steps K to skip up to K such steps")

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop_requested and self.stopped_at is None:
            control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step

    def agree(self, *flags: bool) -> list[bool]:
        """Each flag, true if it is true on any rank (one all-reduce for all of them)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return list(flags)
        values = torch.tensor([float(f) for f in flags], device=self.device)
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        return [bool(v) for v in values.tolist()]

    def on_save(self, args, state, control, **kwargs):
        if self.stopped_at != state.global_step:
            return
        what = self.received.name if self.received else "a signal to another rank"
        note = json.dumps({"step": state.global_step, "checkpoint": f"checkpoint-{state.global_step}", "signal": what})
        if args.should_save:  # the checkpoint is complete (marked): the next run of this folder resumes it
            with atomic_file(Path(args.output_dir) / NOTE) as f:
                f.write(note)
        if args.local_process_index == 0 and os.environ.get(LAUNCHER_NOTE):  # each node's launcher exits 75
            with atomic_file(Path(os.environ[LAUNCHER_NOTE])) as f:
                f.write(note)

    def restore(self) -> None:
        """The signals' handlers as they were; the recipe calls it however training ends (an exception included)."""
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}
