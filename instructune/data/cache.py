"""Prepare once: the mix read, deduplicated, sampled, rendered and tokenised into Arrow shards on disk, under a
fingerprint of everything that decides the result; memory-mapped by the other ranks and by later runs.

The fingerprint is ours, not `datasets`' (which hashes functions and gives up on closures): the datasets given
(path, size, format, and a hash of each file's content), the seed (when a size samples), strict and dedup, the
tokenizer (its name and a hash of its full definition: vocabulary, merges, normalisation, special tokens), its chat
template, the prompt template, max length, train_on_inputs, overlong and ENCODING_VERSION. Change any of them and
the cache misses.

Preparation streams: records go from the files into an Arrow file of conversations (never a list of Python objects)
and, as they are read, in shards of SHARD_ROWS rows to `workers` processes, each shard tokenised into its own Arrow
file (datasets' format, written by its ArrowWriter) in a work folder beside the entry (when a dataset is sampled to
a size, the shards start once all is read). A run killed while preparing leaves its finished shards there, and the
next run with the same fingerprint tokenises only the rest. The entry appears only complete (staged, fsync'd,
renamed: the first rename wins), its marker recording the row count, the statistics and a hash of every file; an
entry that is damaged is rebuilt with a warning. Token ids are stored in the smallest type that holds the vocabulary
(uint16 below 65,536 tokens) and targets as [start, end) spans, not as a second id column.

One process per node prepares (the main one); the others wait for the entry's marker by polling the folder, not in
a collective, so no process-group timeout (`--ddp_timeout`) limits how long preparation may take. If the main
process fails on the data, it leaves the error beside the entry and the waiting ranks raise it too.
"""

import collections
import contextlib
import gc
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from instructune.data.batching import CachedExamples
from instructune.data.encode import COLUMNS, DROPPED, PAIR_COLUMNS, DataStats, encode_columns, stats_of
from instructune.data.formats import PAIR_FORMATS, from_row
from instructune.data.sources import DatasetSpec, load_mix, source_hash
from instructune.errors import DataError
from instructune.files import atomic_file, atomic_folder, cache_root, file_hash

logger = logging.getLogger("instructune")

# Bump when encode.py or templates.py change what an example is: old caches then miss.
ENCODING_VERSION = 2
MARKER = "complete"  # written last: settings, row count, statistics and each file's hash
SHARD_ROWS = 25_000  # rows a worker tokenises at a time: what a crash can lose, and the unit of the progress log
ENCODE_BATCH = 1_000  # rows encoded at a time: batched calls of the template and the tokenizer
WAIT_POLL_S = 1.0


@dataclass(frozen=True)
class Encoding:
    """What decides how a conversation becomes token ids (with the tokenizer)."""
    template: str
    max_length: int
    train_on_inputs: bool = False
    overlong: str = "truncate"


@dataclass
class Prepared:
    rows: "object"  # datasets.Dataset of every conversation's COLUMNS (dropped ones too), memory-mapped
    stats: DataStats
    formats: dict[str, int]  # conversations per format
    hit: bool  # loaded from the cache (or prepared by another process meanwhile)
    folder: Path

    def examples(self) -> CachedExamples:
        """The rows that are training examples (the dropped ones left out), without a pass in Python."""
        import numpy as np

        return CachedExamples(self.rows, np.flatnonzero(self.rows.data.column("outcome").to_numpy() != DROPPED))


def default_cache_dir() -> Path:
    return cache_root() / "tokenized"


def prepare(specs: list[DatasetSpec], tokenizer, encoding: Encoding, seed: int = 42, strict: bool = False,
            dedup: bool = True, cache_dir: str | Path | None = None, workers: int | None = None,
            wait: bool = False) -> Prepared:
    """The tokenised mix, from the cache when it has it. `wait`: this process is not its node's main one; it waits
    for the main process to prepare the entry instead of preparing it too."""
    folder = Path(cache_dir or default_cache_dir()) / fingerprint(specs, seed, strict, dedup, tokenizer, encoding)
    loaded = _load_checked(folder)
    if loaded is None and wait:
        loaded = _wait_for(folder)
    if loaded is not None:
        logger.info("tokenised data: cache hit (%s)", folder)
        return _prepared(*loaded, hit=True, folder=folder)
    from filelock import FileLock

    with FileLock(str(folder) + ".lock"):  # one preparation of an entry at a time; the lock goes with its process
        loaded = _load_checked(folder)  # prepared by another process while this one waited for the lock
        if loaded is not None:
            return _prepared(*loaded, hit=True, folder=folder)
        failed = _failed_note(folder)
        failed.unlink(missing_ok=True)
        try:
            started = time.perf_counter()
            _prepare_into(folder, specs, tokenizer, encoding, seed, strict, dedup, workers)
        except Exception as e:  # the ranks that wait raise it too, instead of waiting for ever
            with atomic_file(failed) as note:  # whole or absent: a waiting rank may read it at any moment
                note.write(str(e) if isinstance(e, DataError) else
                           f"{folder}: the main process failed to prepare the data: {type(e).__name__}: {e}")
            raise
        rows, marker = _load_checked(folder, trusted=True)
        logger.info("tokenised %d records in %.1f s (cache miss; saved in %s)", marker["rows"],
                    time.perf_counter() - started, folder)
        return _prepared(rows, marker, hit=False, folder=folder)


def fingerprint(specs: list[DatasetSpec], seed: int, strict: bool, dedup: bool, tokenizer, encoding: Encoding) -> str:
    digest = hashlib.sha256()
    for spec in specs:
        digest.update(json.dumps([spec.path, spec.size, spec.format, source_hash(spec.path)]).encode())
    sampled = any(spec.size != "all" for spec in specs)
    # strict: a strict run must see the records a lenient one skipped (to name the first), so it has its own entry
    settings = {**asdict(encoding), "seed": seed if sampled else None, "strict": strict, "dedup": dedup,
                "version": ENCODING_VERSION}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    return digest.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    """Name and a hash of the tokenizer's whole definition (a fast tokenizer's JSON; else its vocabulary and
    special tokens), with its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Without the truncation and padding settings, which each call of the tokenizer sets anew.
        definition = json.loads(backend.to_str())
        definition = json.dumps({k: v for k, v in definition.items() if k not in ("truncation", "padding")}, sort_keys=True)
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [type(tokenizer).__name__, tokenizer.name_or_path, definition, tokenizer.chat_template or "",
             json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def features(tokenizer, pairs: bool = False):
    """The cache's column types: ids in uint16 when the vocabulary fits (2 bytes a token, not int64's 8); with
    preference pairs, the rejected side's columns too."""
    import datasets

    ids = "uint16" if len(tokenizer) <= 1 << 16 else "int32"
    types = {"input_ids": datasets.List(datasets.Value(ids)), "target_spans": datasets.List(datasets.Value("int32")),
             "length": datasets.Value("int32"), "full_length": datasets.Value("int32"),
             "target_tokens": datasets.Value("int32"), "outcome": datasets.Value("uint8")}
    if pairs:
        types.update(rejected_ids=datasets.List(datasets.Value(ids)),
                     rejected_spans=datasets.List(datasets.Value("int32")), rejected_length=datasets.Value("int32"))
    return datasets.Features(types)


def _prepare_into(folder: Path, specs, tokenizer, encoding: Encoding, seed, strict, dedup, workers) -> None:
    work = folder.with_name(folder.name + ".work")  # kept across a crash: its finished shards are not redone
    # A mix that samples no dataset is tokenised while it is read; one that does is known only once read whole.
    streamed = all(spec.size == "all" for spec in specs)
    with _Shards(work, tokenizer, encoding, workers) as shards:
        started = time.perf_counter()
        mix = load_mix(specs, seed, strict, dedup, folder=work, on_rows=shards.add if streamed else None)
        logger.info("read %d conversations in %.1f s%s", len(mix), time.perf_counter() - started,
                    ", tokenising meanwhile" if streamed else "")
        pairs = any(mix.formats.get(f) for f in PAIR_FORMATS)
        if not streamed:
            for start in range(0, len(mix), SHARD_ROWS):
                shards.add(mix.rows.select(range(start, min(start + SHARD_ROWS, len(mix))))["conversation"], pairs)
        files = shards.finish(mix.rows, pairs)
    tokens = _token_rows(files)
    outcomes, full_lengths = (tokens.data.column(name).to_numpy() for name in ("outcome", "full_length"))
    stats = stats_of(outcomes.tolist(), full_lengths)
    stats.skipped, stats.duplicates, stats.sources = dict(mix.skipped), dict(mix.duplicates), mix.sources
    with atomic_folder(folder, shared=True) as staging:
        for path in files:
            os.link(path, staging / path.name)  # hard links: the work folder may be read by a writer of another run
        os.link(work / "conversations.arrow", staging / "conversations.arrow")
        hashes = {path.name: file_hash(path) for path in sorted(staging.iterdir())}
        marker = {"settings": asdict(encoding), "rows": len(tokens), "files": hashes, "stats": asdict(stats),
                  "formats": dict(mix.formats)}
        (staging / MARKER).write_text(json.dumps(marker) + "\n")
    del mix, tokens
    shutil.rmtree(work, ignore_errors=True)


class _Shards:
    """Rows tokenised in shards of SHARD_ROWS as they come, each into its own Arrow file in the work folder (named
    by its rows: a shard found there, finished before a crash, is not done again), by `workers` processes forked
    once (the tokenizer inherited, not sent) while the caller reads on. At most two shards a worker wait, so memory
    holds a few shards' rows whatever the mix's size. With one worker or none, each shard is tokenised in this
    process as it fills."""

    def __init__(self, work: Path, tokenizer, encoding: Encoding, workers: int | None):
        from multiprocessing import get_context

        from tqdm.auto import tqdm

        self.work, self.tokenizer, self.encoding = work, tokenizer, encoding
        self.rows, self.pairs, self.start = [], False, 0  # the shard being filled, and its first row
        self.done: list[tuple[Path, bool, int, int]] = []  # each shard's file, whether with the pair columns, rows
        self.waiting = collections.deque()  # ((file, pairs, start, end), result) of the shards being tokenised
        # The objects that exist now (the model's libraries: hundreds of thousands) are left out of the garbage
        # collector's passes while preparing, here and in the forked workers: tokenising makes a few lists per text,
        # and each full pass over all those objects cost 10-15 % of the tokenising time (bench/data_scale.py).
        gc.freeze()
        self.pool = get_context("fork").Pool(workers, _start_worker, (tokenizer, encoding)) \
            if workers and workers > 1 else None
        self.limit = 2 * (workers or 1)
        self.bar = tqdm(desc="tokenising", unit=" records", dynamic_ncols=True)

    def __enter__(self):
        return self

    def __exit__(self, *error):
        self.bar.close()
        if self.pool is not None:
            self.pool.terminate()  # after an error, the shards being tokenised are abandoned; the finished ones stay
        gc.unfreeze()

    def add(self, rows: list[str], pairs: bool) -> None:
        """More rows, in order; `pairs`: one of them is a preference pair."""
        self.rows += rows
        self.pairs |= pairs
        while len(self.rows) >= SHARD_ROWS:
            self._submit(self.rows[:SHARD_ROWS], self.pairs)
            self.rows, self.pairs = self.rows[SHARD_ROWS:], pairs  # what is left came from the last rows given

    def finish(self, rows, pairs: bool) -> list[Path]:
        """Every shard's file, in order, once all are tokenised. `pairs`: the mix (its `rows`, a Dataset) has
        preference pairs, so every shard needs the pair columns: one tokenised without them (before the first pair
        was read) is tokenised again."""
        if self.rows:
            self._submit(self.rows, self.pairs)
        while self.waiting:
            self._collect()
        self.bar.total = self.bar.n
        self.bar.refresh()
        for path, with_pairs, start, end in self.done:
            if pairs and not with_pairs:
                path.unlink()
                _tokenise_shard(rows.select(range(start, end))["conversation"], path, True, self.tokenizer,
                                self.encoding)
        return [path for path, *_ in self.done]

    def _submit(self, rows: list[str], pairs: bool) -> None:
        start, end = self.start, self.start + len(rows)
        path, self.start = self.work / f"tokens-{start:010d}-{end:010d}.arrow", end
        shard = (path, pairs, start, end)
        if path.exists():  # tokenised before a crash
            self._finished(shard, 0.0)
        elif self.pool is None:
            self._finished(shard, _tokenise_shard(rows, path, pairs, self.tokenizer, self.encoding))
        else:
            self.waiting.append((shard, self.pool.apply_async(_in_worker, (rows, path, pairs))))
            while len(self.waiting) >= self.limit:
                self._collect()

    def _collect(self) -> None:
        shard, result = self.waiting.popleft()
        self._finished(shard, result.get())

    def _finished(self, shard: tuple[Path, bool, int, int], seconds: float) -> None:
        self.done.append(shard)
        self.bar.update(shard[3] - shard[2])
        logger.info("tokenised rows %d-%d in %.1f s", shard[2], shard[3], seconds)


def _tokenise_shard(rows: list[str], path: Path, pairs: bool, tokenizer, encoding: Encoding) -> float:
    """One shard's rows tokenised into `path`, an Arrow file as `datasets` writes and memory-maps one (written whole
    or not at all); the seconds it took. Each batch's columns go straight to datasets' ArrowWriter in the cache's
    column types: a `Dataset.map` of the same function (a table built of the rows, each batch turned back into
    Python, the output's types inferred, then cast) cost 4 % more on a shard of bench/data_scale.py's mix."""
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    started, types = time.perf_counter(), features(tokenizer, pairs)
    with atomic_file(path, "wb") as sink, ArrowWriter(features=types, stream=sink) as writer:
        for start in range(0, len(rows), ENCODE_BATCH):
            columns = encode_columns([from_row(row) for row in rows[start:start + ENCODE_BATCH]], tokenizer,
                                     encoding.template, encoding.max_length, encoding.train_on_inputs,
                                     encoding.overlong, pairs)
            writer.write_table(pa.Table.from_pydict(columns, schema=types.arrow_schema))
        writer.finalize(close_stream=False)  # atomic_file closes it, once synced
    return time.perf_counter() - started


_worker: tuple = ()  # (tokenizer, encoding) of a tokenising process


def _start_worker(tokenizer, encoding: Encoding) -> None:
    global _worker
    _worker = (tokenizer, encoding)


def _in_worker(rows: list[str], path: Path, pairs: bool) -> float:
    return _tokenise_shard(rows, path, pairs, *_worker)


def _prepared(rows, marker: dict, hit: bool, folder: Path) -> Prepared:
    return Prepared(rows, DataStats(**marker["stats"]), marker["formats"], hit, folder)


def _token_rows(files: list[Path]):
    """The tokenised shards' rows, in the order of `files`, memory-mapped as one Dataset."""
    import datasets

    return datasets.concatenate_datasets([datasets.Dataset.from_file(str(path)) for path in files])


def conversations(folder: Path):
    """The entry's conversations (JSON rows, formats.from_row), memory-mapped: what `data inspect` shows."""
    import datasets

    return datasets.Dataset.from_file(str(folder / "conversations.arrow"))


def _failed_note(folder: Path) -> Path:
    return folder.with_name(folder.name + ".failed")


def _wait_for(folder: Path) -> tuple | None:
    """The entry, once the node's main process has prepared it; its error if it failed on the data."""
    since, said = time.time(), False
    while True:
        loaded = _load_checked(folder)
        if loaded is not None:
            return loaded
        failed = _failed_note(folder)
        with contextlib.suppress(FileNotFoundError):
            if failed.stat().st_mtime >= since - 1:
                raise DataError(failed.read_text())
        if not said:
            logger.info("waiting for the main process to prepare the data (%s)", folder)
            said = True
        time.sleep(WAIT_POLL_S)


def _load_checked(folder: Path, trusted: bool = False) -> tuple | None:
    """(rows, marker) of the entry, or None when there is none or it is damaged (then it is moved aside and
    removed). `trusted`: just written by this process, not hashed again."""
    if not folder.exists():
        return None
    try:
        marker = json.loads((folder / MARKER).read_text())
        files = {path.name for path in folder.iterdir()} - {MARKER}
        if files != set(marker["files"]) or not trusted and any(
                file_hash(folder / name) != marker["files"][name] for name in files):
            raise ValueError("its files differ from those it was written with")
        rows = _token_rows(sorted(folder.glob("tokens-*.arrow")))  # named by their rows: sorted is in order
        if len(rows) != marker["rows"] or rows.column_names not in (list(COLUMNS), list(COLUMNS + PAIR_COLUMNS)):
            raise ValueError(f"{len(rows)} rows of {rows.column_names}, {marker['rows']} of {list(COLUMNS)} written")
        return rows, marker
    except FileNotFoundError as e:
        if e.filename and Path(e.filename).name == MARKER:  # a folder without its marker: an older version's, or a torn one
            reason = "no completion marker"
        else:
            reason = f"{type(e).__name__}: {e}"
    except Exception as e:  # whatever a damaged arrow file or marker raises
        reason = f"{type(e).__name__}: {e}"
    logger.warning("tokenised data in %s is damaged (%s); tokenising again", folder, str(reason).splitlines()[0][:200])
    aside = folder.with_name(f".{folder.name}.damaged-{os.getpid()}")
    with contextlib.suppress(OSError):
        folder.rename(aside)  # gone at once for every reader; another run may have moved it first
        shutil.rmtree(aside, ignore_errors=True)
    return None
