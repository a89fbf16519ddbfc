"""Read instruction records and refuse bad ones with a message that names file, line or record, and field.

Accepted inputs: a JSON list of records (Alpaca's alpaca_data.json), JSON Lines, a local dataset folder
(`datasets.save_to_disk` output, or a folder of data files), or a Hugging Face dataset id.
Every record has a non-empty string `instruction` and `output`, and an optional string `input`.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from instructune.errors import DataError


@dataclass(frozen=True)
class Record:
    instruction: str
    input: str
    output: str


def load_records(data_path: str) -> list[Record]:
    """All records of `data_path`, validated; raises DataError on the first bad one."""
    path = Path(data_path)
    if path.is_file():
        rows = _read_json_file(path)
    elif path.is_dir() or _looks_like_hub_id(data_path):
        rows = _read_dataset(data_path)
    else:
        raise DataError(f"{data_path}: no such file or folder")
    records = [_validate(where, row) for where, row in rows]
    if not records:
        raise DataError(f"{data_path}: the dataset is empty (no records)")
    return records


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.endswith((".json", ".jsonl"))


def _read_json_file(path: Path) -> Iterator[tuple[str, object]]:
    try:
        text = path.read_bytes().decode("utf-8")
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
    for number, line in enumerate(text.splitlines(), start=1):
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
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, KeyError…)
        raise DataError(f"{data_path}: cannot load the dataset: {type(e).__name__}: {e}".splitlines()[0]) from None
    return ((f"{data_path}: row {i}", row) for i, row in enumerate(dataset))


def _validate(where: str, row: object) -> Record:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a record must be a JSON object, got a {_json_type(row)}")
    fields = {}
    for name in ("instruction", "output"):
        if name not in row:
            raise DataError(f"{where}: missing field '{name}'")
        value = row[name]
        if not isinstance(value, str):
            raise DataError(f"{where}: field '{name}' must be a string, got {_json_type(value)}")
        if not value.strip():
            raise DataError(f"{where}: field '{name}' is empty")
        fields[name] = value
    value = row.get("input")
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: field 'input' must be a string, got {_json_type(value)}")
    return Record(instruction=fields["instruction"], input=value or "", output=fields["output"])


def _json_type(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
