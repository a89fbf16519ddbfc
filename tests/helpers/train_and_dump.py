"""train.py plus callbacks that save each rank's final weights (so that a test can compare ranks) and what the
run really did (probe.py).

    torchrun --nproc_per_node 2 tests/helpers/train_and_dump.py DUMP_DIR <train.py flags>
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

from instructune.cli import run, train
from probe import ProbeTraining


class DumpWeights(TrainerCallback):
    def __init__(self, directory: Path):
        self.directory = directory

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # FSDP2 parameters are DTensor shards: gather them (a collective, so every rank does it).
        weights = {
            name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().contiguous().clone()
            for name, p in model.named_parameters()
        }
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        save_file(weights, self.directory / f"rank{rank}.safetensors")


if __name__ == "__main__":
    sys.exit(run(lambda: train.main(sys.argv[2:], callbacks=[DumpWeights(Path(sys.argv[1])), ProbeTraining(Path(sys.argv[1]))])))
