"""Crash-safe checkpoints: a checkpoint counts only if this run completed it.

The Trainer writes `checkpoint-N/` in place and rotates old ones as soon as the main process is done,
so a job killed mid-save leaves a half-written newest checkpoint and may already have deleted the
last good one. Here:
- the marker of a checkpoint is removed before it is (re)written, and written last, after every
  rank has finished and the files and folder are fsync'ed; it records the step, the run and when;
- "newest" means last completed (the runs' history), not the highest step number: a run resumed
  from an earlier checkpoint writes steps that an older run already wrote;
- rotation keeps the newest `keep` complete checkpoints (and the best one), never the newest less,
  and removes incomplete leftovers;
- an explicit --resume_from_checkpoint that is missing or incomplete is a one-line error, and
  under `auto` rank 0 chooses and every rank resumes the same checkpoint.
"""

import json
import logging
import re
import shutil
import time
from pathlib import Path

from instructune.errors import UserError
from instructune.files import atomic_file, fsync, fsync_tree

logger = logging.getLogger("instructune")

COMPLETE_MARKER = "instructune-checkpoint-complete"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Every checkpoint folder in output_dir, by step."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def completion(checkpoint: Path) -> dict | None:
    """The marker's record ({step, run_id, completed_at}), or None if the checkpoint is incomplete."""
    try:
        record = json.loads((checkpoint / COMPLETE_MARKER).read_text())
        match = CHECKPOINT.match(checkpoint.name)
        if match and record["step"] == int(match.group(1)) and isinstance(record["completed_at"], float):
            return record
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def is_complete(checkpoint: Path) -> bool:
    return completion(checkpoint) is not None


def unmark(checkpoint: Path) -> None:
    """Before a checkpoint folder is (re)written: it is incomplete until mark_complete."""
    (checkpoint / COMPLETE_MARKER).unlink(missing_ok=True)
    fsync(checkpoint)


def mark_complete(checkpoint: Path, step: int, run_id: str) -> None:
    """The marker, once everything in the folder is on disk; `run_id`: the run that wrote it (one per training run,
    written by its main process)."""
    fsync_tree(checkpoint)
    with atomic_file(checkpoint / COMPLETE_MARKER) as f:
        f.write(json.dumps({"step": step, "run_id": run_id, "completed_at": time.time()}) + "\n")


def history(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints, in the order they were completed (the last is the newest)."""
    complete = [(record["completed_at"], p) for p in checkpoints(output_dir) if (record := completion(p))]
    return [p for _, p in sorted(complete)]


def latest_complete(output_dir: str | Path) -> Path | None:
    """The last completed checkpoint; incomplete ones are named in the log and skipped."""
    for folder in checkpoints(output_dir):
        if not is_complete(folder):
            logger.info("skipping %s: incomplete (a run stopped while saving it)", folder)
    completed = history(output_dir)
    return completed[-1] if completed else None


def check_resumable(checkpoint: str | Path) -> Path:
    """An explicit --resume_from_checkpoint PATH: it must exist, be complete and hold the training state."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise UserError(f"--resume_from_checkpoint {path}: no such checkpoint folder")
    if CHECKPOINT.match(path.name) and not is_complete(path):
        raise UserError(f"--resume_from_checkpoint {path}: incomplete checkpoint (a run stopped while saving it); "
                        "pass an earlier one or 'auto'")
    if missing := missing_training_state(path):
        raise UserError(f"--resume_from_checkpoint {path}: no {' and no '.join(missing)}: the run would go on with a "
                        "fresh optimizer (a run with --save_only_model saves none); pass a checkpoint that has them")
    return path


def missing_training_state(checkpoint: Path) -> list[str]:
    """What an exact resume needs and `checkpoint` lacks: the optimizer's state (optimizer.pt; FSDP: optimizer.bin or
    optimizer_0/; DeepSpeed: global_step*/, which holds its scheduler too), the LR schedule (scheduler.pt) and the RNG
    states."""
    deepspeed = any(checkpoint.glob("global_step*"))
    needed = {"optimizer state (optimizer.pt)": deepspeed or any(checkpoint.glob("optimizer*")),
              "scheduler.pt": deepspeed or (checkpoint / "scheduler.pt").exists(),
              "rng_state.pth": any(checkpoint.glob("rng_state*.pth"))}
    return [name for name, present in needed.items() if not present]


def rotate(output_dir: str | Path, keep: int | None, protect: str | None = None) -> None:
    """Keep the `keep` last completed checkpoints (and `protect`, the best one); delete older complete ones and
    every incomplete leftover. Called right after a checkpoint is marked, so nothing else is being written."""
    completed = history(output_dir)
    if not completed:
        return
    kept = set(completed[-keep:] if keep and keep > 0 else completed) | {completed[-1]}
    if protect:
        kept.add(Path(protect))
    kept = {p.resolve() for p in kept}
    for folder in checkpoints(output_dir):
        if folder.resolve() not in kept:
            unmark(folder)  # first: a folder killed half-deleted must not count as complete
            shutil.rmtree(folder, ignore_errors=True)
