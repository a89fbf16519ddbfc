"""Where conversations come from: files, folders and hub ids; several of them mixed with per-dataset sizes;
duplicates removed across all of them.

Accepted inputs: a JSON list of records (Alpaca's alpaca_data.json), JSON Lines, a local dataset folder
(`datasets.save_to_disk` output, or a folder of data files), or a Hugging Face dataset id. A mix is
`--datasets "alpaca_data.json:all,dolly.jsonl:1000,chat.jsonl:10%"` (or a YAML list): per dataset
everything, an exact count or a percentage, sampled reproducibly with the run's seed.
"""

import codecs
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from instructune.data.formats import FORMATS, Conversation, from_row, json_type, to_conversations, to_row
from instructune.errors import DataError
from instructune.files import file_hash, looks_like_hub_id


@dataclass(frozen=True)
class DatasetSpec:
    path: str
    size: str = "all"  # all | K | K%
    format: str | None = None  # None: recognised per record


class Mix:
    """The mixed conversations, held in an Arrow file (one JSON row each: formats.to_row), memory-mapped: a mix of
    millions of records costs disk, not memory. `rows` is that file as a `datasets.Dataset` (sampled rows
    selected); iterating or indexing the mix gives Conversations."""

    def __init__(self, rows, skipped: Counter, duplicates: Counter, sources: dict[str, int], formats: Counter):
        self.rows = rows
        self.skipped = skipped  # per empty field
        self.duplicates = duplicates  # exact, normalised
        self.sources = sources  # conversations taken per dataset
        self.formats = formats  # conversations per format

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Conversation:
        return from_row(self.rows[index]["conversation"])

    def __iter__(self) -> Iterator[Conversation]:
        for batch in self.rows.iter(batch_size=1000):
            yield from map(from_row, batch["conversation"])

    @property
    def conversations(self) -> list[Conversation]:
        """All of them as Python objects: for small mixes (rating, tests); training streams `rows`."""
        return list(self)


WRITE_ROWS = 10_000  # conversations written to the mix's Arrow file at a time (and given to load_mix's on_rows)
SIZE = re.compile(r"all|\d+%?|\d+\.\d+%")


def parse_datasets(value: str) -> list[DatasetSpec]:
    """'a.json:all,b.jsonl:1000,c.jsonl:10%' or a JSON list of such strings or of {path, size, format} objects."""
    try:
        items = json.loads(value) if value.lstrip().startswith("[") else [v for v in value.split(",") if v.strip()]
    except json.JSONDecodeError as e:
        raise DataError(f"--datasets {value[:60]!r}: not a JSON list ({e.msg} at character {e.pos})") from None
    if not isinstance(items, list):
        raise DataError(f"--datasets {value[:60]!r}: expected a list of datasets")
    specs = []
    for item in items:
        if isinstance(item, dict):
            spec = DatasetSpec(str(item.get("path", "")), str(item.get("size", "all")), item.get("format"))
        else:
            item = str(item).strip()
            path, _, size = item.rpartition(":")
            bad_size = path and not SIZE.fullmatch(size) and Path(path).exists() and not Path(item).exists()
            spec = DatasetSpec(path, size) if path and SIZE.fullmatch(size) else DatasetSpec(item, "?" if bad_size else "all")
        if not spec.path or not SIZE.fullmatch(spec.size):
            raise DataError(f"--datasets {item!r}: expected PATH, PATH:all, PATH:COUNT or PATH:PERCENT%")
        if spec.format is not None and spec.format not in FORMATS:
            raise DataError(f"--datasets {spec.path}: unknown format {spec.format!r}; choose one of {', '.join(FORMATS)}")
        if any(Path(spec.path).resolve() == Path(earlier.path).resolve() for earlier in specs):
            raise DataError(f"--datasets: {spec.path} is given twice; name each dataset once (its size says how much "
                            "of it to take)")
        specs.append(spec)
    if not specs:
        raise DataError("--datasets: no dataset given")
    return specs


def load_mix(specs: list[DatasetSpec], seed: int = 42, strict: bool = False, dedup: bool = True,
             folder: Path | None = None, on_rows: Callable[[list[str], bool], None] | None = None) -> Mix:
    """Every dataset streamed, validated and written to `folder`/conversations.arrow (a temporary folder if None),
    duplicates dropped across all of them (first seen kept; 64-bit hashes of the exact and normalised texts are
    kept, not the texts), then each dataset sampled to its size.

    `on_rows(rows, pairs)`: each run of rows kept, as it is written (before any sampling: for a mix that samples
    none), and whether one of them is a preference pair; the tokenisation cache tokenises them while reading goes on."""
    import datasets
    import pyarrow as pa

    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="instructune-mix-"))
        owned = folder
    else:
        folder.mkdir(parents=True, exist_ok=True)
        owned = None
    skipped, duplicates, sources, formats = Counter(), Counter(), {}, Counter()
    seen_exact, seen_normalised = set(), set()
    chosen, total = [], 0  # the rows taken, per dataset
    staging = folder / f".conversations.arrow.{os.getpid()}"
    schema = pa.schema([("conversation", pa.large_string())])
    try:
        with pa.OSFile(str(staging), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            def flush(rows: list[str], pairs: bool) -> None:
                writer.write_batch(pa.record_batch([pa.array(rows, pa.large_string())], schema=schema))
                if on_rows is not None:
                    on_rows(rows, pairs)

            batch, pairs = [], False
            for spec in specs:
                kinds = bytearray()  # each kept conversation's format, to count those sampled
                for conversation in iter_conversations(spec.path, spec.format, strict, skipped):
                    if dedup:
                        exact, normalised = _keys(conversation)
                        if exact in seen_exact or normalised in seen_normalised:
                            duplicates["exact" if exact in seen_exact else "normalised"] += 1
                            continue
                        seen_exact.add(exact)
                        seen_normalised.add(normalised)
                    batch.append(to_row(conversation))
                    kinds.append(FORMATS.index(conversation.format))
                    pairs |= conversation.rejected is not None
                    if len(batch) == WRITE_ROWS:
                        flush(batch, pairs)
                        batch, pairs = [], False
                taken = _sample(len(kinds), spec, seed)
                chosen.append(range(total, total + len(kinds)) if taken is None else [total + i for i in taken])
                sources[spec.path] = len(chosen[-1])
                formats.update(FORMATS[kinds[i]] for i in (taken if taken is not None else range(len(kinds))))
                total += len(kinds)
            if batch:
                flush(batch, pairs)
        path = folder / "conversations.arrow"
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    rows = datasets.Dataset.from_file(str(path))
    if sum(map(len, chosen)) < total:
        rows = rows.select([i for taken in chosen for i in taken])
    mix = Mix(rows, skipped, duplicates, sources, formats)
    if owned is not None:
        weakref.finalize(mix, shutil.rmtree, owned, True)  # the file stays readable while mapped
    return mix


def _keys(conversation: Conversation) -> tuple[int, int]:
    """64-bit hashes of the exact and the normalised (case, white space) texts: 1M records keep 2M integers, not
    their texts; two different conversations share a hash with odds of about n²/2⁶⁵ (3e-8 at a million).

    Every field is set between spaces, so normalising the whole text at once equals normalising each field (white
    space at a field's ends meets the spaces, never a separator). Python's own string hash (64-bit, seeded per
    process) suffices: the hashes live only while one mix is read. 6.5 µs a record, against 10.8 µs for blake2b of
    each field normalised apart: a million records are read in one process before tokenising starts."""
    fields = "".join(f"\0{m.role}\1 {m.content} \1 {m.context} " for m in conversation.messages)
    if conversation.rejected is not None:
        fields += f"\0rejected\1 {conversation.rejected} "
    return hash(fields), hash(" ".join(fields.lower().split()))


def _sample(count: int, spec: DatasetSpec, seed: int) -> list[int] | None:
    """The indices of the dataset's usable conversations to take, in order; None: all of them."""
    if spec.size == "all":
        return None
    wanted = round(float(spec.size[:-1]) / 100 * count) if spec.size.endswith("%") else int(spec.size)
    if wanted > count:
        raise DataError(f"{spec.path}: {spec.size} records asked for, but it has {count} usable ones")
    if wanted == 0:
        raise DataError(f"{spec.path}: {spec.size} of its {count} usable records is none; ask for more or "
                        "leave it out of --datasets")
    return sorted(random.Random(f"{seed}:{spec.path}").sample(range(count), wanted))


def load_conversations(data_path: str, format: str | None = None, strict: bool = False,
                       skipped: Counter | None = None) -> list[Conversation]:
    """The usable conversations of `data_path` as a list (small data: prompts, tests); see iter_conversations."""
    return list(iter_conversations(data_path, format, strict, skipped))


def iter_conversations(data_path: str, format: str | None = None, strict: bool = False,
                       skipped: Counter | None = None) -> Iterator[Conversation]:
    """The usable conversations of `data_path`, streamed; empty ones are counted into `skipped` (per field), or
    refused if `strict`. Raises DataError on the first structurally bad record, or if none is usable."""
    path = Path(data_path)
    if path.is_file():
        rows = read_json_records(path)
    elif path.is_dir() or looks_like_hub_id(data_path):
        rows = _read_dataset(data_path)
    else:
        raise DataError(f"{data_path}: no such file or folder")
    usable, empty_here = 0, Counter()
    for where, row in rows:
        found, empty = to_conversations(where, row, format)
        if not empty:
            usable += len(found)
            yield from found
        elif strict:
            raise DataError(f"{where}: field '{empty[0]}' is empty (without --strict_data such records are skipped)")
        else:
            empty_here[empty[0]] += 1
    if skipped is not None:
        skipped.update(empty_here)
    if not usable:
        what = f" ({skipped_summary(empty_here)})" if empty_here else ""
        raise DataError(f"{data_path}: no usable record{what}")


def source_hash(data_path: str) -> str:
    """A hash of a dataset's content: a file's bytes; a folder's files (names and bytes); a hub dataset's
    fingerprint in the local `datasets` cache."""
    path = Path(data_path)
    if path.is_file():
        return file_hash(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path)}\0{source_hash(str(file))}\0".encode())
        return digest.hexdigest()
    if looks_like_hub_id(data_path):
        return _load_dataset(data_path)._fingerprint
    raise DataError(f"{data_path}: no such file or folder")


def skipped_summary(skipped: Counter) -> str:
    """'4 records with an empty output skipped', per field."""
    return ", ".join(f"{n} record{'s' * (n != 1)} with an empty {name} skipped" for name, n in sorted(skipped.items()))


def read_json_records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) of a JSON list or a JSON Lines file (a `.json` file of lines too), streamed: a file of any
    size is read in bounded memory. `where` names the file and the record or line; unreadable, non-UTF-8 or invalid
    JSON is a one-line DataError naming the place."""
    try:
        handle = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read the file: {e.strerror}") from None
    with handle:
        head = handle.read(CHUNK)
        handle.seek(3 if head.startswith(b"\xef\xbb\xbf") else 0)  # a UTF-8 BOM is harmless
        start = _decode(path, head.removeprefix(b"\xef\xbb\xbf"), 0, final=len(head) < CHUNK).lstrip()
        if path.suffix in (".jsonl", ".ndjson") or start[:1] == "{" and not _one_object(start):
            yield from _json_lines(path, handle)  # many "*.json" files in the wild are JSON Lines
        elif start[:1] == "[":
            yield from _json_array(path, handle)
        else:
            try:
                data = json.loads(_decode(path, handle.read(), 0, final=True))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
            raise DataError(f"{path}: the top level is a JSON {json_type(data)}, expected a list of records "
                            '([{"instruction": ..., "input": ..., "output": ...}, ...])')


CHUNK = 1 << 22  # bytes read at a time
LONGEST_RECORD = 1 << 26  # characters: a JSON list element still unparsed after this much text is invalid, not cut


def _decode(path: Path, data: bytes, offset: int, final: bool, decoder=None) -> str:
    try:
        return decoder.decode(data, final) if decoder else data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {offset + e.start})") from None


def _json_lines(path: Path, handle) -> Iterator[tuple[str, object]]:
    # Split on \n only (binary lines): str.splitlines() also splits on U+2028 and U+0085, which JSON strings may hold.
    offset = handle.tell()
    for number, line in enumerate(handle, start=1):
        text = _decode(path, line, offset, final=True)
        offset += len(line)
        if not text.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(text)
        except json.JSONDecodeError as e:
            if number == 1:
                _refuse_one_object(path, handle)  # a pretty-printed object, not JSON Lines
            raise DataError(f"{path}:{number}:{e.colno}: invalid JSON: {e.msg}") from None


def _one_object(text: str) -> bool:
    """Whether `text` is a single JSON value and nothing more (a file that is one object, not JSON Lines)."""
    try:
        _, end = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        return False
    return not text[end:].strip()


def _refuse_one_object(path: Path, handle) -> None:
    handle.seek(0)
    try:
        data = json.loads(handle.read().decode("utf-8", errors="replace").removeprefix("\ufeff"))
    except json.JSONDecodeError:
        return
    raise DataError(f"{path}: the top level is a JSON {json_type(data)}, expected a list of records "
                    '([{"instruction": ..., "input": ..., "output": ...}, ...])')


def _json_array(path: Path, handle) -> Iterator[tuple[str, object]]:
    """The elements of a top-level JSON list, parsed one at a time from a window of the file."""
    decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    text, position, line, offset, done = "", 0, 1, handle.tell(), False

    def more() -> bool:  # read the next chunk into the window; False at the end of the file
        nonlocal text, position, line, offset, done
        if done:
            return False
        data = handle.read(CHUNK)
        done = len(data) < CHUNK
        line += text.count("\n", 0, position)
        text, position = text[position:] + _decode(path, data, offset, done, utf8), 0
        offset += len(data)
        return True

    def skip_space() -> str:  # the next character that is not white space ("" at the end)
        nonlocal position
        while True:
            match = NOT_SPACE.search(text, position)
            if match:
                position = match.start()
                return text[position]
            position = len(text)
            if not more():
                return ""

    def fail(message: str, at: int):
        before = text.count("\n", 0, at)
        column = at - (text.rfind("\n", 0, at) + 1)
        raise DataError(f"{path}:{line + before}:{column + 1}: invalid JSON: {message}")

    more()
    skip_space()
    position += 1  # the "["
    index = 0
    if skip_space() == "]":
        return
    while True:
        if skip_space() == "":
            fail("Expecting value", position)
        while True:
            try:
                row, end = decoder.raw_decode(text, position)
                break
            except json.JSONDecodeError as e:
                if len(text) - position > LONGEST_RECORD or not more():
                    fail(e.msg, e.pos)
        position = end
        yield f"{path}: record {index}", row
        index += 1
        separator = skip_space()
        position += 1
        if separator == "]":
            break
        if separator != ",":
            fail("Expecting ',' delimiter", position - 1)
    if skip_space():
        fail("Extra data", position)


NOT_SPACE = re.compile(r"[^ \t\n\r]")


def _read_dataset(data_path: str) -> Iterator[tuple[str, object]]:
    dataset = _load_dataset(data_path)
    for start in range(0, len(dataset), 1000):
        batch = dataset[start:start + 1000]
        for offset, values in enumerate(zip(*batch.values())):
            yield f"{data_path}: row {start + offset}", dict(zip(batch, values))


def _load_dataset(data_path: str):
    import datasets

    try:
        if (Path(data_path) / "dataset_info.json").exists() or (Path(data_path) / "dataset_dict.json").exists():
            dataset = datasets.load_from_disk(data_path)
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset["train"]
        else:
            dataset = datasets.load_dataset(data_path, split="train")
    except ConnectionError as e:  # offline, or the Hub cannot be reached
        raise DataError(f"{data_path}: cannot reach the Hugging Face Hub for this dataset id ({e}); download it "
                        "first or pass a local file or folder".replace("\n", " ")) from None
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, KeyError…)
        raise DataError(f"{data_path}: cannot load the dataset: {type(e).__name__}: {e}".splitlines()[0]) from None
    return dataset

