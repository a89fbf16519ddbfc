"""Reading and validating instruction data: good inputs load, bad ones stop the run with one line
that names the file, the line or record, and the field, before anything is written."""

import json

import pytest

from instructune.cli import run_training
from instructune.data import Record, load_records
from instructune.errors import DataError

from conftest import PYTHON, SAMPLE_DATA, run_command


def test_sample_data_loads_and_is_varied():
    records = load_records(str(SAMPLE_DATA))
    assert 100 <= len(records) <= 200
    with_input = sum(1 for r in records if r.input)
    assert 0.2 < with_input / len(records) < 0.8
    lengths = sorted(len(r.output) for r in records)
    assert lengths[0] < 20 and lengths[-1] > 250  # short and long responses


def test_json_lines_and_json_lines_named_json(tmp_path):
    rows = [{"instruction": "Say hi.", "output": "Hi."}, {"instruction": "Add.", "input": "1 and 2", "output": "3"}]
    for name in ("data.jsonl", "data.json"):
        path = tmp_path / name
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
        assert load_records(str(path)) == [Record("Say hi.", "", "Hi."), Record("Add.", "1 and 2", "3")]


def test_null_input_is_empty(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "Say hi.", "input": None, "output": "Hi."}]))
    assert load_records(str(path))[0].input == ""


def test_local_dataset_folders(tmp_path):
    import datasets

    rows = {"instruction": ["Say hi.", "Add."], "input": ["", "1 and 2"], "output": ["Hi.", "3"], "category": ["a", "b"]}
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict(rows).save_to_disk(str(saved))
    assert [r.output for r in load_records(str(saved))] == ["Hi.", "3"]
    files = tmp_path / "files"  # a folder of data files: the same code path as a hub dataset id
    files.mkdir()
    (files / "train.jsonl").write_text("\n".join(json.dumps(dict(zip(rows, v))) for v in zip(*rows.values())))
    assert [r.instruction for r in load_records(str(files))] == ["Say hi.", "Add."]


def test_unreachable_hub_dataset_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as error:
        load_records("tatsu-lab/alpaca")
    assert str(error.value).startswith("tatsu-lab/alpaca: cannot load the dataset")
    assert "\n" not in str(error.value)


BAD_INPUTS = {
    "invalid_json": ('[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]', ":2:", "invalid JSON"),
    "top_level_object": ('{"instruction": "a", "output": "b", "more": 1}', "", "top level is a JSON object"),
    "missing_instruction": ('[{"instruction": "a", "output": "b"}, {"input": "x", "output": "y"}]', ": record 1", "missing field 'instruction'"),
    "number_output": ('[{"instruction": "a", "output": 42}]', ": record 0", "field 'output' must be a string, got number"),
    "list_instruction": ('[{"instruction": ["a"], "output": "b"}]', ": record 0", "field 'instruction' must be a string"),
    "empty_output": ('[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "  "}]', ": record 1", "field 'output' is empty"),
    "record_not_object": ('[{"instruction": "a", "output": "b"}, "text"]', ": record 1", "must be a JSON object"),
    "input_not_string": ('[{"instruction": "a", "input": 3, "output": "b"}]', ": record 0", "field 'input' must be a string"),
    "empty_list": ("[]", "", "the dataset is empty"),
    "bad_jsonl_line": ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', ":2:", "invalid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_stops_before_anything_is_written(case, tmp_path, tiny_llama, capsys):
    text, where, message = BAD_INPUTS[case]
    data = tmp_path / ("data.jsonl" if case == "bad_jsonl_line" else "data.json")
    data.write_text(text)
    output_dir = tmp_path / "out"
    code = run_training(["--model_name_or_path", str(tiny_llama), "--data_path", str(data), "--output_dir", str(output_dir)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert error.startswith(f"error: {data}{where}"), error
    assert message in error
    assert not output_dir.exists()


@pytest.mark.parametrize("content", [None, b"\xff\xfe\x00 not utf-8"])
def test_unreadable_file(content, tmp_path, tiny_llama, capsys):
    data = tmp_path / "data.json"
    if content is not None:
        data.write_bytes(content)
    code = run_training(["--model_name_or_path", str(tiny_llama), "--data_path", str(data), "--output_dir", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert error == (f"error: {data}: no such file or folder" if content is None else f"error: {data}: not UTF-8 text (bad byte at offset 0)")
    assert not (tmp_path / "out").exists()


def test_train_py_reports_bad_data_without_traceback(tmp_path, tiny_llama):
    data = tmp_path / "data.json"
    data.write_text('[{"instruction": "a", "output": ""}]')
    result = run_command(
        [PYTHON, "train.py", "--model_name_or_path", str(tiny_llama), "--data_path", str(data), "--output_dir", str(tmp_path / "out")]
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {data}: record 0: field 'output' is empty"
    ]
    assert not (tmp_path / "out").exists()
