"""The tokenisation cache is checked, not trusted (#20 §4): a damaged entry (truncated or garbage arrow file, a stray
file, altered token ids under a valid marker) is rebuilt with a warning, never trained on or a traceback; two
writers of one entry take turns, and the second finds the first's entry."""

import json
import logging
import threading

import pyarrow as pa
import pytest

from instructune.data.cache import Encoding, prepare
from instructune.data.encode import example
from instructune.data.sources import DatasetSpec
from instructune.modeling.models import load_tokenizer

from conftest import SAMPLE_DATA

pytestmark = pytest.mark.slow  # a model loaded or built per test: the full suite's tier


SPECS = [DatasetSpec(str(SAMPLE_DATA), "40")]


def encode(tokenizer, cache_dir):
    """(examples, hit) of the sample's 40 records."""
    prepared = prepare(SPECS, tokenizer, Encoding("alpaca", 128), cache_dir=cache_dir)
    return [example(prepared.rows[int(i)]) for i in prepared.examples().indices], prepared.hit


def arrow_file(cache_dir):
    (folder,) = [p for p in cache_dir.iterdir() if p.is_dir() and "." not in p.name]
    return folder, next(folder.glob("tokens-*.arrow"))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path):
    path.write_bytes(b"\x00garbage" * 100)


def stray_file(path):
    (path.parent / "state.json").write_text("{not json")


def altered_ids(path):
    """A valid arrow file with other token ids: the same rows, each input id shifted by one."""
    table = pa.ipc.open_stream(path.read_bytes()).read_all()  # in memory: the file is rewritten below
    shifted = pa.array([[i + 1 for i in row] for row in table.column("input_ids").to_pylist()],
                       type=table.schema.field("input_ids").type)
    table = table.set_column(table.schema.get_field_index("input_ids"), "input_ids", shifted)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


@pytest.mark.parametrize("damage", [truncate, garbage, stray_file, altered_ids])
def test_a_damaged_entry_is_rebuilt_with_a_warning(tiny_llama, tmp_path, caplog, damage):
    tokenizer = load_tokenizer(tiny_llama)
    expected, hit = encode(tokenizer, tmp_path)
    assert not hit
    folder, arrow = arrow_file(tmp_path)
    damage(arrow)
    with caplog.at_level(logging.WARNING, logger="instructune"):
        examples, hit = encode(tokenizer, tmp_path)
    assert not hit and examples == expected
    assert f"tokenised data in {folder} is damaged" in caplog.text and "tokenising again" in caplog.text
    assert encode(tokenizer, tmp_path)[1]  # rebuilt: a hit again
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [folder.name]  # nothing aside


def test_a_marker_from_before_the_check_is_rebuilt(tiny_llama, tmp_path):
    """An entry whose marker has no hashes (an older version's) is not trusted either."""
    tokenizer = load_tokenizer(tiny_llama)
    expected, _ = encode(tokenizer, tmp_path)
    folder, _ = arrow_file(tmp_path)
    (folder / "complete").write_text(json.dumps({"template": "alpaca"}) + "\n")
    examples, hit = encode(tokenizer, tmp_path)
    assert not hit and examples == expected


def test_two_writers_of_one_entry_do_not_collide(tiny_llama, tmp_path):
    """Seen: two runs sharing a cache raced on one .partial folder (1 crash in 16)."""
    tokenizer = load_tokenizer(tiny_llama)
    expected, _ = encode(tokenizer, tmp_path / "reference")
    for attempt in range(4):
        cache_dir, results, errors = tmp_path / f"shared-{attempt}", [], []

        def run():
            try:
                results.append(encode(load_tokenizer(tiny_llama), cache_dir)[0])
            except Exception as e:  # noqa: BLE001 - any failure of either writer fails the test below
                errors.append(e)

        threads = [threading.Thread(target=run) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors and results == [expected] * 3
        assert [p.name for p in cache_dir.iterdir() if p.name.startswith(".")] == []  # no staging left behind
        assert encode(tokenizer, cache_dir)[1]
