"""train.py that sends a signal when a given step begins: to one rank only, or to a given process (a launcher, a job
script); with SIGKILL to one rank, only in the first run (a run restarted by torchrun trains on).

    SIGNAL_AT_STEP=5 SIGNAL=TERM SIGNAL_TO=rank1|PID torchrun ... tests/helpers/train_and_signal.py <train.py flags>
"""

import os
import signal
import sys

from transformers import TrainerCallback

from instructune.cli import run, train

AT_STEP = int(os.environ["SIGNAL_AT_STEP"])
SIGNAL = getattr(signal, "SIG" + os.environ.get("SIGNAL", "TERM"))
TO = os.environ["SIGNAL_TO"]


class SignalAtStep(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 != AT_STEP or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            return
        if TO == "rank1" and args.process_index == 1:
            os.kill(os.getpid(), SIGNAL)
        elif TO.isdigit() and args.process_index == 0:  # a process of the test's choosing (a launcher, a job script)
            os.kill(int(TO), SIGNAL)


if __name__ == "__main__":
    sys.exit(run(lambda: train.main(sys.argv[1:], callbacks=[SignalAtStep()])))
