"""The tokenisation cache is checked, not trusted (#20 §4): a damaged entry (truncated or garbage arrow file, bad
state.json, altered token ids under a valid marker) is rebuilt with a warning, never trained on or a traceback; two
runs writing one entry each stage their own folder, and the first rename wins."""

import json
import logging
import threading

import pyarrow as pa
import pytest

from instructune.data import load_conversations
from instructune.data.cache import encode_cached
from instructune.modeling.models import load_tokenizer

from conftest import SAMPLE_DATA

pytestmark = pytest.mark.slow  # a model loaded or built per test: the full suite's tier


@pytest.fixture(scope="module")
def conversations():
    return load_conversations(str(SAMPLE_DATA))[:40]


def encode(conversations, tokenizer, cache_dir):
    return encode_cached(conversations, tokenizer, "alpaca", 128, False, "truncate", cache_dir=cache_dir)


def arrow_file(cache_dir):
    (folder,) = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
    return folder, next(folder.glob("*.arrow"))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path):
    path.write_bytes(b"\x00garbage" * 100)


def bad_state(path):
    (path.parent / "state.json").write_text("{not json")


def altered_ids(path):
    """A valid arrow file with other token ids: the same rows, each input id shifted by one."""
    table = pa.ipc.open_stream(path.read_bytes()).read_all()  # in memory: the file is rewritten below
    shifted = pa.array([[i + 1 for i in row] for row in table.column("input_ids").to_pylist()],
                       type=table.schema.field("input_ids").type)
    table = table.set_column(table.schema.get_field_index("input_ids"), "input_ids", shifted)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


@pytest.mark.parametrize("damage", [truncate, garbage, bad_state, altered_ids])
def test_a_damaged_entry_is_rebuilt_with_a_warning(tiny_llama, conversations, tmp_path, caplog, damage):
    tokenizer = load_tokenizer(tiny_llama)
    expected, _, hit = encode(conversations, tokenizer, tmp_path)
    assert not hit
    folder, arrow = arrow_file(tmp_path)
    damage(arrow)
    with caplog.at_level(logging.WARNING, logger="instructune"):
        examples, _, hit = encode(conversations, tokenizer, tmp_path)
    assert not hit and examples == expected
    assert f"tokenised data in {folder} is damaged" in caplog.text and "tokenising again" in caplog.text
    assert encode(conversations, tokenizer, tmp_path)[2]  # rebuilt: a hit again
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # nothing left aside


def test_a_marker_from_before_the_check_is_rebuilt(tiny_llama, conversations, tmp_path):
    """An entry whose marker has no hashes (an older version's) is not trusted either."""
    tokenizer = load_tokenizer(tiny_llama)
    expected, _, _ = encode(conversations, tokenizer, tmp_path)
    folder, _ = arrow_file(tmp_path)
    (folder / "complete").write_text(json.dumps({"template": "alpaca"}) + "\n")
    examples, _, hit = encode(conversations, tokenizer, tmp_path)
    assert not hit and examples == expected


def test_two_writers_of_one_entry_do_not_collide(tiny_llama, conversations, tmp_path):
    """Seen: two runs sharing a cache raced on one .partial folder (1 crash in 16)."""
    tokenizer = load_tokenizer(tiny_llama)
    expected, _, _ = encode(conversations, tokenizer, tmp_path / "reference")
    for attempt in range(4):
        cache_dir, results, errors = tmp_path / f"shared-{attempt}", [], []

        def run():
            try:
                results.append(encode(conversations, load_tokenizer(tiny_llama), cache_dir)[0])
            except Exception as e:  # noqa: BLE001 - any failure of either writer fails the test below
                errors.append(e)

        threads = [threading.Thread(target=run) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors and results == [expected] * 3
        assert [p.name for p in cache_dir.iterdir() if p.name.startswith(".")] == []  # no staging left behind
        assert encode(conversations, tokenizer, cache_dir)[2]
