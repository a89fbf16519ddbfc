"""Writing so that readers see all or nothing: a folder staged beside its target, fsync'd, then renamed into place.
Used by every writer of a model folder, a diff and the tokenisation cache."""

import errno
import os
import shutil
import socket
import tempfile
from pathlib import Path

from instructune.errors import UserError


class atomic_folder:
    """A staging folder beside `target`, its files fsync'd and renamed to it only when the block succeeds; removed
    otherwise.

    Readers never see a half-written folder: until the rename it is a hidden `.NAME.partial-HOST-PID-*` folder, its
    own writer's. A partial folder left by a process of this machine that no longer runs is removed; another
    writer's, never. `shared=True`: other writers may race for the same target (a cache): an existing target is no
    error, and the first rename wins while the others discard theirs. With target None (a dry run) the block gets
    None and nothing is written.
    """

    def __init__(self, target: Path | None, shared: bool = False):
        self.target, self.shared = target, shared
        self.staging = None

    def __enter__(self) -> Path | None:
        if self.target is None:
            return None
        if self.target.exists() and not self.shared:
            raise UserError(f"{self.target}: already exists; choose a new folder")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.target.parent.glob(f".{self.target.name}.partial-*"):
            if not _writer_alive(stale.name.removeprefix(f".{self.target.name}.partial-")):
                shutil.rmtree(stale, ignore_errors=True)
        prefix = f".{self.target.name}.partial-{socket.gethostname()}-{os.getpid()}-"
        self.staging = Path(tempfile.mkdtemp(prefix=prefix, dir=self.target.parent))
        return self.staging

    def __exit__(self, error_type, error, traceback) -> None:
        if self.staging is None:
            return
        if error_type is None:
            try:
                self.staging.chmod(0o755)
                fsync_tree(self.staging)
                self.staging.rename(self.target)
                fsync_tree(self.target.parent, files=False)
                return
            except OSError as e:
                if not (self.shared and self.target.exists()):
                    shutil.rmtree(self.staging, ignore_errors=True)
                    if out_of_space(e):
                        raise UserError(f"no space left while writing {self.target}; nothing was written") from None
                    raise
                # another writer's rename came first: theirs stands, ours goes
        shutil.rmtree(self.staging, ignore_errors=True)
        if out_of_space(error):
            raise UserError(f"no space left while writing {self.target}; nothing was written") from None


def _writer_alive(suffix: str) -> bool:
    """Whether the writer named in a staging folder's suffix (HOST-PID-random) still runs: False for one of this
    machine's processes that ended, and for a name of no such form (left by an older version); True for another
    machine's writer (whose processes are not ours to see)."""
    host, _, pid = suffix.rpartition("-")[0].rpartition("-")
    if not host or not pid.isdigit():
        return False
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_tree(folder: Path, files: bool = True) -> None:
    """Flush a folder's files (and the folder itself) to disk, so that a rename after it publishes complete data."""
    if files:
        for path in folder.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def out_of_space(error: BaseException | None) -> bool:
    """Disk full, quota exceeded, or the file-size limit (ulimit -f) reached."""
    codes = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    if isinstance(error, OSError):
        return error.errno in codes
    # safetensors' Rust writer (used by save_pretrained) reports I/O errors as text: "... (os error 28)"
    return type(error).__name__ == "SafetensorError" and any(f"(os error {code})" in str(error) for code in codes)
