"""Data is prepared once: a second run memory-maps exactly what the first computed, anything that changes the result
(data, tokenizer, template, max length, train_on_inputs, sampling) misses, token ids take 2 bytes where the
vocabulary allows, a preparation killed half-way resumes from its finished shards, and the ranks that do not
prepare wait for the one that does (and share its error)."""

import json
import re
import threading

import pytest

from instructune.data import encode_conversations, load_mix
from instructune.data.cache import Encoding, prepare
from instructune.data.encode import example
from instructune.data.sources import DatasetSpec
from instructune.errors import DataError
from instructune.modeling import models

from conftest import PYTHON, SAMPLE_DATA, free_port, run_command
from test_train import tiny_run_flags

ALPACA = Encoding("alpaca", 256)


def tokenizer(path):
    loaded = models.load_tokenizer(str(path))
    models.add_missing_special_tokens(loaded, "[PAD]")
    return loaded


def entries(cache_dir):
    return sorted(p for p in cache_dir.iterdir() if p.is_dir() and "." not in p.name)


def examples_of(prepared):
    return [example(prepared.rows[int(i)]) for i in prepared.examples().indices]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(SAMPLE_DATA.read_bytes())
    return path


def test_a_second_run_loads_what_the_first_computed(tiny_llama, data, tmp_path):
    llama = tokenizer(tiny_llama)
    specs = [DatasetSpec(str(data))]
    expected, expected_stats = encode_conversations(load_mix(specs).conversations, llama, "alpaca", 256)
    first = prepare(specs, llama, ALPACA, cache_dir=tmp_path / "cache")
    llama("some text", truncation=True, max_length=8, padding="max_length")  # leaves settings on the tokenizer
    second = prepare(specs, llama, ALPACA, cache_dir=tmp_path / "cache")
    assert (first.hit, second.hit) == (False, True)
    assert examples_of(first) == examples_of(second) == expected  # the same examples, truncation included
    assert first.stats == second.stats
    assert (second.stats.records, second.stats.kept, second.stats.truncated) == \
        (expected_stats.records, expected_stats.kept, expected_stats.truncated)
    assert expected_stats.truncated > 0
    assert len(entries(tmp_path / "cache")) == 1
    assert second.rows.features["input_ids"].feature.dtype == "uint16"  # a 32K vocabulary: 2 bytes a token


def test_what_changes_the_result_misses(tiny_llama, tiny_opt, data, tmp_path):
    llama, cache = tokenizer(tiny_llama), tmp_path / "cache"
    specs = [DatasetSpec(str(data))]
    before = examples_of(prepare(specs, llama, ALPACA, cache_dir=cache))
    with_new_token = tokenizer(tiny_llama)
    with_new_token.add_tokens(["<new>"])
    with_chat_template = tokenizer(tiny_llama)  # the tiny tokenizer has none, so that 'chat' can render
    with_chat_template.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    variants = {
        "another tokenizer": (specs, tokenizer(tiny_opt), ALPACA),
        "the same tokenizer with a token more": (specs, with_new_token, ALPACA),
        "a chat template": (specs, with_chat_template, ALPACA),
        "another prompt template": (specs, with_chat_template, Encoding("chat", 256)),
        "another max length": (specs, llama, Encoding("alpaca", 128)),
        "train_on_inputs": (specs, llama, Encoding("alpaca", 256, train_on_inputs=True)),
        "overlong drop": (specs, llama, Encoding("alpaca", 256, overlong="drop")),
        "a subset": ([DatasetSpec(str(data), "50")], llama, ALPACA),
    }
    for name, arguments in variants.items():
        assert not prepare(*arguments, cache_dir=cache).hit, name
    assert not prepare([DatasetSpec(str(data), "50")], llama, ALPACA, seed=7, cache_dir=cache).hit  # another sample
    assert not prepare(specs, llama, ALPACA, dedup=False, cache_dir=cache).hit
    assert prepare(specs, llama, ALPACA, cache_dir=cache).hit  # and the original still hits
    records = json.loads(data.read_text())
    records[3]["output"] = "A different answer."
    data.write_text(json.dumps(records))
    changed = prepare(specs, llama, ALPACA, cache_dir=cache)
    assert not changed.hit and examples_of(changed)[3] != before[3] and examples_of(changed)[4:] == before[4:]
    assert len(entries(cache)) == 4 + len(variants)  # the original, the variants, seed, dedup, the changed file


def test_a_folder_without_its_marker_is_not_a_cache(tiny_llama, data, tmp_path):
    """A run killed after writing the data but before marking it complete: the next run tokenises again."""
    llama, specs = tokenizer(tiny_llama), [DatasetSpec(str(data))]
    first = prepare(specs, llama, ALPACA, cache_dir=tmp_path)
    (first.folder / "complete").unlink()
    again = prepare(specs, llama, ALPACA, cache_dir=tmp_path)
    assert not again.hit and (again.folder / "complete").exists()
    assert examples_of(again) == examples_of(first)


def test_a_preparation_killed_half_way_resumes_from_its_finished_shards(tiny_llama, data, tmp_path, monkeypatch):
    from instructune.data import cache

    llama, specs = tokenizer(tiny_llama), [DatasetSpec(str(data))]
    reference = examples_of(prepare(specs, llama, ALPACA, cache_dir=tmp_path / "reference"))
    monkeypatch.setattr(cache, "SHARD_ROWS", 40)  # 125 records: 4 shards
    encoded, real = [], cache.encode_columns

    def dies_in_the_third_shard(conversations, *args):
        if len(encoded) == 2:
            raise KeyboardInterrupt  # as a kill would: no error note, the work folder left as it is
        encoded.append(conversations[0].source)
        return real(conversations, *args)

    monkeypatch.setattr(cache, "encode_columns", dies_in_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare(specs, llama, ALPACA, cache_dir=tmp_path / "cache")
    assert not entries(tmp_path / "cache")
    monkeypatch.setattr(cache, "encode_columns", lambda conversations, *args: (encoded.append(
        conversations[0].source), real(conversations, *args))[1])
    resumed = prepare(specs, llama, ALPACA, cache_dir=tmp_path / "cache")
    assert len(encoded) == 4  # shards 1 and 2 were kept; only 3 and 4 tokenised again
    assert examples_of(resumed) == reference
    assert not list((tmp_path / "cache").glob("*.work"))  # the work folder goes once the entry is complete


def test_worker_processes_tokenise_shards_while_the_mix_is_read_into_one_processs_rows(tiny_llama, data, tmp_path,
                                                                                         monkeypatch):
    """Two worker processes tokenise shards of 30 rows while the mix is read (one that samples nothing) or after it
    (one that samples): the rows are those of encoding the whole mix at once. Preference pairs first read after
    some shards were tokenised without the pair columns: those shards are tokenised again with them."""
    from instructune.data import cache, sources
    from instructune.data.encode import encode_columns

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": f"Is {n} even?", "chosen": "Yes." if n % 2 == 0 else "No.",
                                            "rejected": "No." if n % 2 == 0 else "Yes."}) for n in range(20)))
    llama = tokenizer(tiny_llama)
    monkeypatch.setattr(cache, "SHARD_ROWS", 30)
    monkeypatch.setattr(sources, "WRITE_ROWS", 10)  # the reading hands over 10 rows at a time
    redone, tokenise_shard = [], cache._tokenise_shard
    monkeypatch.setattr(cache, "_tokenise_shard", lambda rows, path, *args: (redone.append(path.name),
                                                                             tokenise_shard(rows, path, *args))[1])
    for name, specs in {"streamed": [DatasetSpec(str(data))], "sampled": [DatasetSpec(str(data), "100")],
                        "pairs after 4 shards": [DatasetSpec(str(data)), DatasetSpec(str(pairs))]}.items():
        mix = load_mix(specs)
        with_pairs = name.startswith("pairs")
        expected = encode_columns(mix.conversations, llama, "alpaca", 256, pairs=with_pairs)
        prepared = prepare(specs, llama, ALPACA, cache_dir=tmp_path / "cache", workers=2)
        assert prepared.rows.to_dict() == expected, name
        assert len(list(prepared.folder.glob("tokens-*.arrow"))) == -(-len(mix) // 30), name
    assert sum(map(len, prepared.rows["rejected_ids"])) > 0 and len(prepared.rows) == 125 + 20
    # called in this process only to redo a shard (the workers' calls are theirs): the 4 read before the first pair
    assert redone == [f"tokens-{start:010d}-{start + 30:010d}.arrow" for start in range(0, 120, 30)]


def test_ranks_that_do_not_prepare_wait_for_the_one_that_does_and_share_its_error(tiny_llama, data, tmp_path):
    llama, specs = tokenizer(tiny_llama), [DatasetSpec(str(data))]
    waited = []
    waiter = threading.Thread(target=lambda: waited.append(prepare(specs, tokenizer(tiny_llama), ALPACA,
                                                                   cache_dir=tmp_path, wait=True)))
    waiter.start()
    waiter.join(timeout=2)
    assert waiter.is_alive() and not entries(tmp_path)  # it prepares nothing itself
    prepared = prepare(specs, llama, ALPACA, cache_dir=tmp_path)
    waiter.join(timeout=30)
    assert waited and waited[0].hit and examples_of(waited[0]) == examples_of(prepared)

    data.write_text('[{"instruction": "a", "output": 3}]')
    errors = []

    def wait_for_bad():
        try:
            prepare(specs, tokenizer(tiny_llama), ALPACA, cache_dir=tmp_path, wait=True)
        except DataError as e:
            errors.append(str(e))

    waiter = threading.Thread(target=wait_for_bad)
    waiter.start()
    with pytest.raises(DataError, match="field 'output' must be a string") as raised:
        prepare(specs, llama, ALPACA, cache_dir=tmp_path)
    waiter.join(timeout=30)
    assert errors == [str(raised.value)]


@pytest.mark.slow  # a 2-process launch
@pytest.mark.distributed
def test_a_preparation_longer_than_the_ddp_timeout_completes(tiny_llama, tmp_path):
    """Seen with peers: rank 0 tokenised a large mix while the others waited in a barrier, and the run died on the
    process-group timeout. Here the preparation takes 6 s in a group whose collectives time out after 4 s (a barrier
    there fails); the other rank waits on the cache folder, then loads what rank 0 prepared."""
    flags = tiny_run_flags(tiny_llama, tmp_path / "out", steps=1) + ["--tokenized_cache_dir", str(tmp_path / "cache")]
    done = run_command([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "tests/helpers/slow_preparation.py", *flags], PREPARE_SECONDS="6",
                       GROUP_TIMEOUT="4")
    assert done.returncode == 0, done.stderr[-3000:]
    took = re.search(r"tokenised \d+ records in ([\d.]+) s \(cache miss", done.stderr)
    assert took and float(took.group(1)) >= 6, done.stderr[-3000:]  # rank 0 prepared, for longer than the timeout
    assert (tmp_path / "out" / "train_results.json").exists()
