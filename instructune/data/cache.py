"""Tokenise once: a batched `datasets` map, stored on disk under a fingerprint of everything that decides
its result, loaded by the other ranks and by later runs.

The fingerprint is ours, not `datasets`' (which hashes functions and gives up on closures): the
content of the conversations to encode (so the data files' content, and the mix, sampling and dedup
that chose from them), the tokenizer (its name and a hash of its full definition: vocabulary, merges,
normalisation, special tokens), its chat template, the prompt template, max length, train_on_inputs,
overlong and ENCODING_VERSION. Change any of them and the cache misses.

The main process of each node tokenises first (with a progress bar) while the others wait, then
they load its result; a folder appears only complete (each writer writes its own staging folder, fsync'd, then
renames it; the first rename wins), so a run killed while tokenising leaves nothing that a later run would take for
a cache. The cache is checked, not trusted: its marker records the row count and a hash of every file, and an
entry that is damaged (truncated, garbage, altered token ids) is rebuilt with a warning.
"""

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from functools import partial
from pathlib import Path

from instructune.data.encode import DataStats, encode_columns, examples_and_stats
from instructune.data.formats import Conversation, Message
from instructune.files import atomic_folder, cache_root

logger = logging.getLogger("instructune")

# Bump when encode.py or templates.py change what an example is: old caches then miss.
ENCODING_VERSION = 1
MARKER = "complete"  # written last: settings, row count and each file's hash


def default_cache_dir() -> Path:
    return cache_root() / "tokenized"


def encode_cached(conversations: list[Conversation], tokenizer, template: str, max_length: int,
                  train_on_inputs: bool, overlong: str, cache_dir: str | Path | None = None, workers: int | None = None,
                  main_process_first=None) -> tuple[list[dict], DataStats, bool]:
    """(examples, stats, cache hit?) as encode_conversations would give them, from the cache when it has them.

    `main_process_first`: TrainingArguments.main_process_first, so that in a distributed run one process per
    node tokenises and the others load.
    """
    rows = [_to_json(c) for c in conversations]
    settings = {"template": template, "max_length": max_length, "train_on_inputs": train_on_inputs,
                "overlong": overlong, "version": ENCODING_VERSION}
    folder = Path(cache_dir or default_cache_dir()) / fingerprint(rows, tokenizer, settings)
    first = main_process_first(local=True, desc="tokenising") if main_process_first else contextlib.nullcontext()
    with first:
        columns = _load_checked(folder)
        hit = columns is not None
        if not hit:
            started = time.perf_counter()
            _tokenise_into(folder, rows, tokenizer, settings, workers)
            logger.info("tokenised %d records in %.1f s (cache miss; saved in %s)", len(rows),
                        time.perf_counter() - started, folder)
            columns = _columns(folder)  # just written (by this run or one that won the rename): not hashed again
        else:
            logger.info("tokenised data: cache hit (%s)", folder)
    examples, stats = examples_and_stats(columns)
    return examples, stats, hit


def fingerprint(rows: list[str], tokenizer, settings: dict) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(hashlib.sha256(row.encode()).digest())
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


def _to_json(conversation: Conversation) -> str:
    return json.dumps({"messages": [[m.role, m.content, m.context] for m in conversation.messages],
                       "format": conversation.format, "source": conversation.source}, ensure_ascii=False)


def _from_json(row: str) -> Conversation:
    data = json.loads(row)
    return Conversation(tuple(Message(*m) for m in data["messages"]), data["format"], data["source"])


def _encode_batch(batch: dict, tokenizer, settings: dict) -> dict:
    conversations = [_from_json(row) for row in batch["conversation"]]
    return encode_columns(conversations, tokenizer, settings["template"], settings["max_length"],
                          settings["train_on_inputs"], settings["overlong"])


def _tokenise_into(folder: Path, rows: list[str], tokenizer, settings: dict, workers: int | None) -> None:
    import datasets

    dataset = datasets.Dataset.from_dict({"conversation": rows})
    encoded = dataset.map(partial(_encode_batch, tokenizer=tokenizer, settings=settings), batched=True,
                          batch_size=1000, num_proc=workers if workers and workers > 1 else None,
                          remove_columns=["conversation"], new_fingerprint=folder.name, desc="tokenising")
    with atomic_folder(folder, shared=True) as staging:  # another run may be writing the same entry
        encoded.save_to_disk(str(staging))
        files = {path.name: _file_hash(path) for path in sorted(staging.iterdir())}
        (staging / MARKER).write_text(json.dumps({"settings": settings, "rows": len(encoded), "files": files}) + "\n")


def _file_hash(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _columns(folder: Path) -> dict[str, list]:
    import datasets

    table = datasets.load_from_disk(str(folder)).data
    return {name: table.column(name).to_pylist() for name in ("input_ids", "labels", "length", "outcome")}


def _load_checked(folder: Path) -> dict[str, list] | None:
    """The entry's columns, or None when there is none or it is damaged (then it is moved aside and removed)."""
    if not folder.exists():
        return None
    try:
        marker = json.loads((folder / MARKER).read_text())
        files = {path.name for path in folder.iterdir()} - {MARKER}
        if files != set(marker["files"]) or any(_file_hash(folder / name) != marker["files"][name] for name in files):
            raise ValueError("its files differ from those it was written with")
        columns = _columns(folder)
        if len(columns["length"]) != marker["rows"]:
            raise ValueError(f"{len(columns['length'])} rows, {marker['rows']} written")
        return columns
    except FileNotFoundError as e:
        if e.filename and Path(e.filename).name == MARKER:  # a folder without its marker: an older version's, or a torn one
            reason = "no completion marker"
        else:
            reason = f"{type(e).__name__}: {e}"
    except Exception as e:  # whatever a damaged arrow file, state.json or marker raises
        reason = f"{type(e).__name__}: {e}"
    logger.warning("tokenised data in %s is damaged (%s); tokenising again", folder, str(reason).splitlines()[0][:200])
    aside = folder.with_name(f".{folder.name}.damaged-{os.getpid()}")
    with contextlib.suppress(OSError):
        folder.rename(aside)  # gone at once for every reader; another run may have moved it first
        shutil.rmtree(aside, ignore_errors=True)
    return None
