"""Reading and validating instruction data: good inputs load, bad ones stop the run with one line
that names the file, the line or record, and the field, before anything is written."""

import json
import re
from collections import Counter
from typing import NamedTuple

import pytest

from instructune.cli import main
from instructune.data import load_conversations
from instructune.errors import DataError

from conftest import PYTHON, SAMPLE_DATA, SHARED_DATA, run_command


class Record(NamedTuple):
    instruction: str
    input: str
    output: str


def load_records(path: str, strict: bool = False) -> tuple[list[Record], Counter]:
    """(instruction, input, output) of each record, and the skip counts."""
    skipped = Counter()
    conversations = load_conversations(path, strict=strict, skipped=skipped)
    return [Record(c.messages[0].content, c.messages[0].context, c.messages[1].content) for c in conversations], skipped


def test_sample_data_loads_and_is_varied():
    records, skipped = load_records(str(SAMPLE_DATA))
    assert not skipped
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
        assert load_records(str(path))[0] == [Record("Say hi.", "", "Hi."), Record("Add.", "1 and 2", "3")]


def test_null_input_is_empty(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "Say hi.", "input": None, "output": "Hi."}]))
    assert load_records(str(path))[0][0].input == ""


def test_local_dataset_folders(tmp_path):
    import datasets

    rows = {"instruction": ["Say hi.", "Add."], "input": ["", "1 and 2"], "output": ["Hi.", "3"], "category": ["a", "b"]}
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict(rows).save_to_disk(str(saved))
    assert [r.output for r in load_records(str(saved))[0]] == ["Hi.", "3"]
    files = tmp_path / "files"  # a folder of data files: the same code path as a hub dataset id
    files.mkdir()
    (files / "train.jsonl").write_text("\n".join(json.dumps(dict(zip(rows, v))) for v in zip(*rows.values())))
    assert [r.instruction for r in load_records(str(files))[0]] == ["Say hi.", "Add."]


def test_unreachable_hub_dataset_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as error:
        load_records("tatsu-lab/alpaca")
    assert str(error.value).startswith("tatsu-lab/alpaca: cannot reach the Hugging Face Hub")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["nonexist/foo.csv", "nonexist/foo.json", "./nonexist/foo", "a/b/c"])
def test_a_missing_path_is_not_taken_for_a_hub_id(name):
    with pytest.raises(DataError, match=f"^{re.escape(name)}: no such file or folder$"):
        load_records(name)


def test_empty_records_are_skipped_and_counted(tmp_path):
    rows = [{"instruction": "Say hi.", "output": "Hi."}, {"instruction": "Say bye.", "output": ""},
            {"instruction": " ", "output": "x"}, {"instruction": "Add.", "input": "1 and 2", "output": "\n"}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    records, skipped = load_records(str(path))
    assert records == [Record("Say hi.", "", "Hi.")]
    assert skipped == {"output": 2, "instruction": 1}
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: record 1: field 'output' is empty"):
        load_records(str(path), strict=True)


def test_json_lines_split_on_newlines_only_and_bom(tmp_path):
    rows = [{"instruction": "Keep\u2028this\u0085together.", "output": "One\u2028record."}, {"instruction": "b", "output": "c"}]
    path = tmp_path / "d.jsonl"
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    assert "\u2028" in text and "\u0085" in text  # raw, as many real files hold them
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    records, _ = load_records(str(path))
    assert [r.instruction for r in records] == ["Keep\u2028this\u0085together.", "b"]
    bom_json = tmp_path / "d.json"
    bom_json.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    assert load_records(str(bom_json))[0] == records


BAD_INPUTS = {
    "invalid_json": ('[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]', ":2:", "invalid JSON"),
    "top_level_object": ('{"instruction": "a", "output": "b", "more": 1}', "", "top level is a JSON object"),
    "fits_no_format": ('[{"instruction": "a", "output": "b"}, {"input": "x", "output": "y"}]', ": record 1", "fits no known format; expected instruction/output (Alpaca)"),
    "number_output": ('[{"instruction": "a", "output": 42}]', ": record 0", "field 'output' must be a string, got number"),
    "list_instruction": ('[{"instruction": ["a"], "output": "b"}]', ": record 0", "field 'instruction' must be a string"),
    "only_empty_records": ('[{"instruction": "c", "output": "  "}]', "", "no usable record (1 record with an empty output skipped)"),
    "record_not_object": ('[{"instruction": "a", "output": "b"}, "text"]', ": record 1", "must be a JSON object"),
    "input_not_string": ('[{"instruction": "a", "input": 3, "output": "b"}]', ": record 0", "field 'input' must be a string"),
    "empty_list": ("[]", "", "no usable record"),
    "bad_jsonl_line": ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', ":2:", "invalid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_stops_before_anything_is_written(case, tmp_path, tiny_llama, capsys):
    text, where, message = BAD_INPUTS[case]
    data = tmp_path / ("data.jsonl" if case == "bad_jsonl_line" else "data.json")
    data.write_text(text)
    output_dir = tmp_path / "out"
    code = main(["train", "--model_name_or_path", str(tiny_llama), "--data_path", str(data), "--output_dir", str(output_dir)])
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
    code = main(["train", "--model_name_or_path", str(tiny_llama), "--data_path", str(data), "--output_dir", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert error == (f"error: {data}: no such file or folder" if content is None else f"error: {data}: not UTF-8 text (bad byte at offset 0)")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a launched process
def test_train_py_reports_bad_data_without_traceback(tmp_path, tiny_llama):
    data = tmp_path / "data.json"
    data.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "a", "output": ["b"]}]')
    result = run_command(
        [PYTHON, "train.py", "--model_name_or_path", str(tiny_llama), "--data_path", str(data), "--output_dir", str(tmp_path / "out")]
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {data}: record 1: field 'output' must be a string, got list"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_real_alpaca_data_trains_with_empty_records_skipped(tiny_llama, tmp_path, caplog, capsys):
    """Stanford Alpaca's own data has records with an empty output; its train.py trains past them, so do we."""
    data = SHARED_DATA / "random_9k.json"
    if not data.exists():
        pytest.skip(f"real Alpaca data not found at {data} (see the developers' guide)")
    flags = ["--model_name_or_path", str(tiny_llama), "--data_path", str(data), "--max_steps", "1",
             "--per_device_train_batch_size", "2", "--model_max_length", "256", "--report_to", "none", "--disable_tqdm", "True"]
    with caplog.at_level("INFO", logger="instructune"):
        assert main(["train", *flags, "--output_dir", str(tmp_path / "out")]) == 0
    assert "data: 9225 records → " in caplog.text and "4 records with an empty output skipped" in caplog.text
    summary = json.loads((tmp_path / "out" / "train_results.json").read_text())
    assert summary["data"]["skipped"] == {"output": 4} and summary["data"]["records"] == 9225
    capsys.readouterr()
    assert main(["train", *flags, "--output_dir", str(tmp_path / "strict"), "--strict_data", "True"]) == 2
    assert not (tmp_path / "strict").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {data}: record 1461: field 'output' is empty")


def test_a_missing_model_folder_is_one_line(tmp_path, capsys):
    assert main(["train", "--model_name_or_path", str(tmp_path / "no-model"), "--output_dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'no-model'}: no such model folder")
    assert not (tmp_path / "out").exists()
