"""train.py whose data preparation takes PREPARE_SECONDS longer (a sleep in the main process's tokenising), as a
large mix's would, in a process group whose collectives time out after GROUP_TIMEOUT seconds: the other ranks must
wait for the preparation without a collective.

transformers 5 passes --ddp_timeout to the process group on GPUs but not with use_cpu (TrainingArguments'
_setup_devices leaves it out on that path), so the group is made here, with that timeout, as a GPU run's would be;
the Trainer's PartialState then uses it.

    PREPARE_SECONDS=6 GROUP_TIMEOUT=4 torchrun --nproc_per_node 2 tests/helpers/slow_preparation.py <train.py flags>
"""

import os
import sys
import time
from datetime import timedelta

import torch.distributed

from instructune.cli import run, train
from instructune.data import cache

encode_columns = cache.encode_columns


def slow_encode_columns(*args, **kwargs):
    time.sleep(float(os.environ["PREPARE_SECONDS"]))
    return encode_columns(*args, **kwargs)


cache.encode_columns = slow_encode_columns
torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=float(os.environ["GROUP_TIMEOUT"])))

if __name__ == "__main__":
    sys.exit(run(lambda: train.main(sys.argv[1:])))
