"""train.py that kills its whole job (SIGKILL to the process group, like `kill -9` of the launcher) in the middle of
saving the checkpoint of a given step: its model is written, its optimizer state is not.

    KILL_AT_STEP=8 torchrun ... tests/helpers/train_and_kill.py <train.py flags>
The launcher must run in its own session (the test starts it with start_new_session=True).
"""

import os
import signal
import sys

from transformers import Trainer

from instructune.cli import run, train

KILL_AT_STEP = int(os.environ["KILL_AT_STEP"])
save_optimizer = Trainer._save_optimizer_and_scheduler


def save_optimizer_or_die(self, output_dir):
    if self.state.global_step == KILL_AT_STEP:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    save_optimizer(self, output_dir)


Trainer._save_optimizer_and_scheduler = save_optimizer_or_die

if __name__ == "__main__":
    sys.exit(run(lambda: train.main(sys.argv[1:])))
