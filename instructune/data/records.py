"""Read instruction records and refuse bad ones with a message that names file, line or record, and field.

Accepted inputs: a JSON list of records (Alpaca's alpaca_data.json), JSON Lines, a local dataset folder
(`datasets.save_to_disk` output, or a folder of data files), or a Hugging Face dataset id.
Every record has a string `instruction` and `output`, and an optional string `input`. Structural
faults are errors; a record whose instruction or output is empty is skipped and counted, as Stanford
Alpaca's train.py trains past them (its own 52K set has such records), or refused with strict=True.
"""

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from instructune.errors import DataError


@dataclass(frozen=True)
class Record:
    instruction: str
    input: str
    output: str


def load_records(data_path: str, strict: bool = False) -> tuple[list[Record], Counter]:
    """The usable records of `data_path` and, per field, how many were skipped for being empty.

    Raises DataError on the first structurally bad record, or on the first empty one if `strict`.
    """
    path = Path(data_path)
    if path.is_file():
        rows = _read_json_file(path)
    elif path.is_dir() or looks_like_hub_id(data_path):
        rows = _read_dataset(data_path)
    else:
        raise DataError(f"{data_path}: no such file or folder")
    records, skipped = [], Counter()
    for where, row in rows:
        record, empty_field = _validate(where, row)
        if empty_field is None:
            records.append(record)
        elif strict:
            raise DataError(f"{where}: field '{empty_field}' is empty (without --strict_data such records are skipped)")
        else:
            skipped[empty_field] += 1
    if not records:
        what = f" ({skipped_summary(skipped)})" if skipped else ""
        raise DataError(f"{data_path}: no usable record{what}")
    return records, skipped


def skipped_summary(skipped: Counter) -> str:
    """'4 records with an empty output skipped', per field."""
    return ", ".join(f"{n} record{'s' * (n != 1)} with an empty {field} skipped" for field, n in sorted(skipped.items()))


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".txt", ".parquet", ".arrow", ".gz", ".zip")


def looks_like_hub_id(name: str) -> bool:
    """owner/name with no data-file extension: anything else that does not exist is a missing path."""
    return bool(HUB_ID.fullmatch(name)) and not name.lower().endswith(DATA_FILE_SUFFIXES)


def _read_json_file(path: Path) -> Iterator[tuple[str, object]]:
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
            f"{path}: the top level is a JSON {_json_type(data)}, expected a list of records "
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


def _validate(where: str, row: object) -> tuple[Record, str | None]:
    """The record, and the first of instruction/output that is empty (None if neither)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a record must be a JSON object, got a {_json_type(row)}")
    for name in ("instruction", "output", "input"):
        if name not in row and name != "input":
            raise DataError(f"{where}: missing field '{name}'")
        value = row.get(name)
        if not isinstance(value, str) and not (name == "input" and value is None):
            raise DataError(f"{where}: field '{name}' must be a string, got {_json_type(value)}")
    record = Record(instruction=row["instruction"], input=row.get("input") or "", output=row["output"])
    empty = next((name for name in ("instruction", "output") if not row[name].strip()), None)
    return record, empty


def _json_type(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
