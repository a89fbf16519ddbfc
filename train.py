"""Stanford Alpaca's entry point: `torchrun --nproc_per_node=N train.py --model_name_or_path ... --data_path ...`.

The same flags as Alpaca's train.py (transformers 4 names are mapped to transformers 5), or a YAML
file with `--config`. The work is done by instructune (see instructune/training/recipe.py).
"""

from instructune.cli import train_main

if __name__ == "__main__":
    train_main()
