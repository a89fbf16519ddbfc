"""Where conversations come from: files, folders and hub ids; several of them mixed with per-dataset sizes;
duplicates removed across all of them.

Accepted inputs: a JSON list of records (Alpaca's alpaca_data.json), JSON Lines, a local dataset folder
(`datasets.save_to_disk` output, or a folder of data files), or a Hugging Face dataset id. A mix is
`--datasets "alpaca_data.json:all,dolly.jsonl:1000,chat.jsonl:10%"` (or a YAML list): per dataset
everything, an exact count or a percentage, sampled reproducibly with the run's seed.
"""

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from instructune.data.formats import FORMATS, Conversation, json_type, to_conversations
from instructune.errors import DataError
from instructune.files import looks_like_hub_id


@dataclass(frozen=True)
class DatasetSpec:
    path: str
    size: str = "all"  # all | K | K%
    format: str | None = None  # None: recognised per record


@dataclass
class Mix:
    conversations: list[Conversation]
    skipped: Counter = field(default_factory=Counter)  # per empty field
    duplicates: Counter = field(default_factory=Counter)  # exact, normalised
    sources: dict[str, int] = field(default_factory=dict)  # conversations taken per dataset
    formats: Counter = field(default_factory=Counter)  # conversations per format


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


def load_mix(specs: list[DatasetSpec], seed: int = 42, strict: bool = False, dedup: bool = True) -> Mix:
    """Every dataset read and validated, duplicates dropped across all of them (first seen kept), then each
    sampled to its size."""
    mix, seen_exact, seen_normalised = Mix([]), set(), set()
    for spec in specs:
        conversations = []
        for conversation in load_conversations(spec.path, spec.format, strict, mix.skipped):
            if dedup:
                exact = _key(conversation, normalise=False)
                normalised = _key(conversation, normalise=True)
                if exact in seen_exact or normalised in seen_normalised:
                    mix.duplicates["exact" if exact in seen_exact else "normalised"] += 1
                    continue
                seen_exact.add(exact)
                seen_normalised.add(normalised)
            conversations.append(conversation)
        taken = _sample(conversations, spec, seed)
        mix.conversations += taken
        mix.sources[spec.path] = len(taken)
        mix.formats.update(c.format for c in taken)
    return mix


def _key(conversation: Conversation, normalise: bool) -> tuple:
    def text(s: str) -> str:
        return " ".join(s.lower().split()) if normalise else s

    return tuple((m.role, text(m.content), text(m.context)) for m in conversation.messages)


def _sample(conversations: list[Conversation], spec: DatasetSpec, seed: int) -> list[Conversation]:
    if spec.size == "all":
        return conversations
    count = round(float(spec.size[:-1]) / 100 * len(conversations)) if spec.size.endswith("%") else int(spec.size)
    if count > len(conversations):
        raise DataError(f"{spec.path}: {spec.size} records asked for, but it has {len(conversations)} usable ones")
    if count == 0:
        raise DataError(f"{spec.path}: {spec.size} of its {len(conversations)} usable records is none; ask for more or "
                        "leave it out of --datasets")
    chosen = sorted(random.Random(f"{seed}:{spec.path}").sample(range(len(conversations)), count))
    return [conversations[i] for i in chosen]


def load_conversations(data_path: str, format: str | None = None, strict: bool = False,
                       skipped: Counter | None = None) -> list[Conversation]:
    """The usable conversations of `data_path`; empty ones are counted into `skipped` (per field), or refused
    if `strict`. Raises DataError on the first structurally bad record."""
    path = Path(data_path)
    if path.is_file():
        rows = read_json_records(path)
    elif path.is_dir() or looks_like_hub_id(data_path):
        rows = _read_dataset(data_path)
    else:
        raise DataError(f"{data_path}: no such file or folder")
    conversations, empty_here = [], Counter()
    for where, row in rows:
        found, empty = to_conversations(where, row, format)
        if not empty:
            conversations += found
        elif strict:
            raise DataError(f"{where}: field '{empty[0]}' is empty (without --strict_data such records are skipped)")
        else:
            empty_here[empty[0]] += 1
    if skipped is not None:
        skipped.update(empty_here)
    if not conversations:
        what = f" ({skipped_summary(empty_here)})" if empty_here else ""
        raise DataError(f"{data_path}: no usable record{what}")
    return conversations


def skipped_summary(skipped: Counter) -> str:
    """'4 records with an empty output skipped', per field."""
    return ", ".join(f"{n} record{'s' * (n != 1)} with an empty {name} skipped" for name, n in sorted(skipped.items()))


def read_json_records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) of a JSON list or a JSON Lines file (a `.json` file of lines too), `where` naming the file and
    the record or line; unreadable, non-UTF-8 or invalid JSON is a one-line DataError naming the place."""
    try:
        text = path.read_bytes().decode("utf-8").removeprefix("\ufeff")  # a UTF-8 BOM is harmless
    except OSError as e:
        raise DataError(f"{path}: cannot read the file: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    if path.suffix in (".jsonl", ".ndjson"):
        return _json_lines(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # Many "*.json" files in the wild are really JSON Lines: one object per line.
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _json_lines(path, text)
        raise DataError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, list):
        raise DataError(
            f"{path}: the top level is a JSON {json_type(data)}, expected a list of records "
            '([{"instruction": ..., "input": ..., "output": ...}, ...])'
        )
    return ((f"{path}: record {i}", row) for i, row in enumerate(data))


def _json_lines(path: Path, text: str) -> list[tuple[str, object]]:
    rows = []
    # Split on \n only: str.splitlines() also splits on U+2028 and U+0085, which JSON strings may contain.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}:{e.colno}: invalid JSON: {e.msg}") from None
    return rows


def _read_dataset(data_path: str) -> Iterator[tuple[str, object]]:
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
    return ((f"{data_path}: row {i}", row) for i, row in enumerate(dataset))

