"""train.py that kills its whole job (SIGKILL to the process group, like `kill -9` of the launcher)
at a given step, either right after that step's checkpoint is complete or in the middle of saving it.

    KILL_AT_STEP=8 KILL_WHEN=after_save|during_save torchrun ... tests/helpers/train_and_kill.py <train.py flags>
The launcher must run in its own session (the test starts it with start_new_session=True).
"""

import os
import signal
import sys

from transformers import Trainer, TrainerCallback

from instructune.cli import run, train

KILL_AT_STEP = int(os.environ["KILL_AT_STEP"])
KILL_WHEN = os.environ["KILL_WHEN"]


def kill_job() -> None:
    os.killpg(os.getpgid(0), signal.SIGKILL)


class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == KILL_AT_STEP and args.process_index == 0:
            kill_job()


if KILL_WHEN == "during_save":
    # The model of checkpoint-KILL_AT_STEP is written, its optimizer state is not.
    save_optimizer = Trainer._save_optimizer_and_scheduler

    def save_optimizer_or_die(self, output_dir):
        if self.state.global_step == KILL_AT_STEP:
            kill_job()
        save_optimizer(self, output_dir)

    Trainer._save_optimizer_and_scheduler = save_optimizer_or_die

if __name__ == "__main__":
    callbacks = [KillAfterSave()] if KILL_WHEN == "after_save" else []
    sys.exit(run(lambda: train.main(sys.argv[1:], callbacks=callbacks)))
