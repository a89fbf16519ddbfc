"""instructune: instruction fine-tuning of causal language models on the Hugging Face Trainer.

The pipeline, one room per stage: config → data → modeling → training (export included) → checkpoint, told top
to bottom in `training/recipe.py`; `cli/` holds the commands, `config/` turns command lines (Alpaca's included)
and YAML files into the run's typed arguments.
"""

__version__ = "0.1.0"
