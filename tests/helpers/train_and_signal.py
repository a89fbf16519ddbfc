"""train.py that sends signals when given steps begin, each to rank 1 only or to the launcher or job script that the
test started (SCRIPT_PID). A SIGKILL (a node failure) happens in the first run only: a run restarted by torchrun
trains on.

    SIGNALS="3:KILL:rank1,7:TERM:script" SCRIPT_PID=... torchrun ... tests/helpers/train_and_signal.py <train.py flags>
"""

import os
import signal
import sys

from transformers import TrainerCallback

from instructune.cli import run, train

EVENTS = [(int(step), getattr(signal, f"SIG{name}"), target)
          for step, name, target in (event.split(":") for event in os.environ["SIGNALS"].split(","))]


class SignalAtStep(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        for step, sent, target in EVENTS:
            if step != state.global_step + 1 or (sent == signal.SIGKILL and restarted):
                continue
            if target == "rank1" and args.process_index == 1:
                os.kill(os.getpid(), sent)
            elif target == "script" and args.process_index == 0:
                os.kill(int(os.environ["SCRIPT_PID"]), sent)


if __name__ == "__main__":
    sys.exit(run(lambda: train.main(sys.argv[1:], callbacks=[SignalAtStep()])))
