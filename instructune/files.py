"""Files and folders, for every stage: where instructune keeps its caches, what a local path is and what a hub id
is, an output that never lands on an input, and writing so that readers see all or nothing (a folder staged beside
its target, fsync'd, then renamed into place: model folders, diffs, the tokenisation cache)."""

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from instructune.errors import ConfigError, UserError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".txt", ".parquet", ".arrow", ".gz", ".zip")


def cache_root() -> Path:
    """~/.cache/instructune (XDG_CACHE_HOME honoured; INSTRUCTUNE_CACHE to move it): built-in models, tokenised data,
    measured CPU peaks."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "instructune"
    return Path(os.environ.get("INSTRUCTUNE_CACHE", default))


def file_hash(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks (a data file or a cache shard of any size)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def looks_like_hub_id(name: str) -> bool:
    """owner/name with no data-file extension: anything else that does not exist is a missing path."""
    return bool(HUB_ID.fullmatch(name)) and not name.lower().endswith(DATA_FILE_SUFFIXES)


def refuse_output_over_inputs(output: Path, inputs: dict[str, list], flag: str) -> None:
    """An output (file or folder) is never one of the inputs ({what: paths}), never holds one and never lies inside
    one: writing or emptying it, or the next run reading it, would take the user's files."""
    resolved = Path(output).resolve()
    for what, paths in inputs.items():
        for path in filter(None, paths):
            given = Path(path).resolve()
            if not given.exists():  # a hub id, a built-in name
                continue
            if given == resolved:
                where = "folder" if given.is_dir() else "file"
                raise ConfigError(f"{output}: is the {what}'s {where}; choose another {flag}")
            if resolved in given.parents:
                raise ConfigError(f"{output}: holds the {what} ({path}); choose another {flag}")
            if given in resolved.parents:
                raise ConfigError(f"{output}: lies inside the {what} ({path}); choose another {flag}")


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


def fsync(path: Path) -> None:
    """Flush a file or a folder (its entries) to disk; a link is left alone."""
    if path.is_symlink():
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder: Path, files: bool = True) -> None:
    """Flush a folder's files and folders (deepest first) and the folder itself, so that a rename or a marker after
    it publishes complete data."""
    if files:
        for path in sorted(folder.rglob("*"), reverse=True):
            fsync(path)
    fsync(folder)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w"):
    """A file written aside (`.NAME.partial-HOST-PID-*` beside it), fsync'd and renamed to `path` when the block
    succeeds, removed otherwise: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, staging = tempfile.mkstemp(prefix=f".{path.name}.partial-{socket.gethostname()}-{os.getpid()}-",
                                           dir=path.parent)
    try:
        with open(descriptor, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(staging, 0o644)  # mkstemp's 0600 would hide it from others sharing the folder
        os.replace(staging, path)
        fsync(path.parent)
    finally:
        Path(staging).unlink(missing_ok=True)


@contextlib.contextmanager
def png_figure(path: Path, size: tuple[float, float] = (7, 4)):
    """(figure, axes) of a matplotlib figure (Agg: no display on training nodes or servers), laid out and written
    to `path` as a PNG when the block ends, whole or not at all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=size)
    try:
        yield figure, axes
        figure.tight_layout()
        with atomic_file(path, "wb") as f:
            figure.savefig(f, dpi=100, format="png")
    finally:
        plt.close(figure)


def out_of_space(error: BaseException | None) -> bool:
    """Disk full, quota exceeded, or the file-size limit (ulimit -f) reached."""
    codes = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    if isinstance(error, OSError):
        return error.errno in codes
    # safetensors' Rust writer (used by save_pretrained) reports I/O errors as text: "... (os error 28)"
    return type(error).__name__ == "SafetensorError" and any(f"(os error {code})" in str(error) for code in codes)
