"""The run summary: what a training run leaves beside its model (train_results.json: metrics, the prompt template,
the training length, strategy, data, speed, losses). Written by training/export.py; read by inference, which needs
the prompt template the model was trained with, without depending on training."""

import json
from pathlib import Path

RUN_SUMMARY = "train_results.json"


def find(model_folder: str | Path) -> tuple[Path, dict] | None:
    """(file, summary) of the run that made a model folder: in it, or around it for a merged adapter (run/merged)."""
    for folder in (Path(model_folder), Path(model_folder).parent):
        if (folder / RUN_SUMMARY).is_file():
            return folder / RUN_SUMMARY, json.loads((folder / RUN_SUMMARY).read_text())
    return None
