"""Crash-safe checkpoints: a checkpoint counts only once every rank has finished writing it.

The Trainer writes `checkpoint-N/` in place and rotates old ones as soon as the main process is done,
so a job killed mid-save leaves a half-written newest checkpoint and may already have deleted the
last good one. Here a checkpoint is marked complete (a marker file, written last, after all ranks
synchronise), `--resume_from_checkpoint auto` takes the newest complete one, and rotation never
deletes a complete checkpoint to make room for an incomplete one.
"""

import logging
import os
import re
import shutil
from pathlib import Path

logger = logging.getLogger("instructune")

COMPLETE_MARKER = "instructune-checkpoint-complete"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint folder in output_dir, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return sorted(found)


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE_MARKER).exists()


def mark_complete(checkpoint: Path) -> None:
    marker = checkpoint / COMPLETE_MARKER
    with open(marker, "w") as f:
        f.write("complete\n")
        f.flush()
        os.fsync(f.fileno())


def latest_complete(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones after it are named in the log and skipped."""
    for step, folder in reversed(checkpoints(output_dir)):
        if is_complete(folder):
            return folder
        logger.info("skipping %s: incomplete (the run stopped while saving it)", folder)
    return None


def rotate(output_dir: str | Path, keep: int | None, protect: str | None = None) -> None:
    """Keep the newest `keep` complete checkpoints (and `protect`, the best one); drop older complete
    ones and incomplete leftovers older than the newest complete checkpoint."""
    found = checkpoints(output_dir)
    complete = [folder for _, folder in found if is_complete(folder)]
    if not complete:
        return
    newest_step = max(step for step, folder in found if is_complete(folder))
    kept = {folder.resolve() for folder in (complete[-keep:] if keep and keep > 0 else complete)}
    if protect:
        kept.add(Path(protect).resolve())
    for step, folder in found:
        if folder.resolve() not in kept and (is_complete(folder) or step < newest_step):
            shutil.rmtree(folder, ignore_errors=True)
