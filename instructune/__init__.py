"""instructune: instruction fine-tuning of causal language models on the Hugging Face Trainer.

The pipeline, one module per stage: config → data → models → trainer → export, told top to bottom
in `recipe.py`; `cli.py` turns command lines (Alpaca's included) and YAML files into a run config.
"""

__version__ = "0.1.0"
