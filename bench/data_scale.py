"""Data preparation at scale: a generated mix of up to a million records prepared (read, converted, deduplicated,
rendered, tokenised, masked, cached) against the raw tokenizer's throughput on the same texts, measured in the same
run; its memory at three sizes; the cache's bytes per token; a warm start; packing and length grouping; and
`data inspect` on the cache.

The mix is built from `../shared/data/` (Alpaca 9K and Dolly 3K records) with a deterministic variation per record
(a numbered instruction, so deduplication keeps every one): half Alpaca-shaped records in one JSON list, a quarter
ShareGPT and a quarter messages conversations in JSON Lines (some multi-turn, some with a system prompt). The
tokenizer is SmolLM2's (the built-in model), max length 2048, 2 processes.

- prep_ratio: our cold records/s at the largest size ÷ the raw tokenizer's records/s (its Rust backend's
  `encode_batch_fast` of 1,000 texts a call in 2 processes, over each record's prompt and response texts formatted by
  plain string formatting: the tokenizer's work alone, the limit), measured on the smallest mix just before the
  largest run and just after, the mean of the two (this host's speed drifts by up to 15 % within minutes). Also
  printed: the ratio to the tokenizer's ordinary call (`tokenizer(texts)`, what a `datasets.map` of a tokenising
  function runs), which builds a dict per text and is slower. Also: our records tokenised per second in each tenth of
  the run (a slowdown at the end would show), and when the reading (in one process, while workers tokenise) finished.
- peak RSS of preparation: the preparing process plus its largest worker (ru_maxrss of each), at each size; the
  slope between the smallest and largest size per record.
- warm_start_s: `train.py --max_steps 1` on the cached mix, minus the same on a 100-record file: the time the data
  adds from launch to the end of the first step.
- pack_s: best fit decreasing of all the examples' lengths, and length grouping (the Trainer's sampler), the larger.
- inspect_s: `instructune data inspect` of the mix, reading the cache the run used.

    .venv/bin/python bench/data_scale.py                                   # ~10 minutes on 2 CPU cores
    .venv/bin/python bench/data_scale.py --sizes 100000 1000000           # two sizes: ~7 minutes

Last line, machine-readable: prep_ratio=… prep_ratio_call=… peak_rss_gb=… rss_slope_kb_per_record=… warm_start_s=… pack_s=… inspect_s=…
"""

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

MAX_LENGTH, WORKERS = 2048, 2
SYSTEM = "You are a helpful assistant."
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.\n\n### Instruction:\n{}\n\n### Response:")


def base_records() -> list[dict]:
    records = json.loads((SHARED / "random_9k.json").read_text()) + json.loads((SHARED / "dolly_3k.json").read_text())
    return [r for r in records if r["instruction"].strip() and r["output"].strip()]


def generate(folder: Path, count: int) -> list[Path]:
    """count records: half Alpaca (a JSON list), a quarter ShareGPT, a quarter messages (JSON Lines)."""
    base, generator = base_records(), random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "alpaca.json", folder / "sharegpt.jsonl", folder / "messages.jsonl"]
    files = [open(p, "w") for p in paths]
    files[0].write("[\n")
    for k in range(count):
        record = base[k % len(base)]
        instruction = f"{record['instruction']} (task {k})"
        kind = 0 if k % 4 < 2 else k % 4 - 1
        if kind == 0:
            files[0].write((",\n" if k else "") + json.dumps({"instruction": instruction, "input": record["input"],
                                                               "output": record["output"]}))
            continue
        turns = [(instruction + ("\n\n" + record["input"] if record["input"] else ""), record["output"])]
        if generator.random() < 0.3:  # a second exchange
            other = base[generator.randrange(len(base))]
            turns.append((other["instruction"], other["output"]))
        system = generator.random() < 0.3
        if kind == 1:
            conversation = [{"from": "system", "value": SYSTEM}] if system else []
            conversation += [t for user, answer in turns for t in ({"from": "human", "value": user},
                                                                   {"from": "gpt", "value": answer})]
            files[1].write(json.dumps({"conversations": conversation}) + "\n")
        else:
            messages = [{"role": "system", "content": SYSTEM}] if system else []
            messages += [m for user, answer in turns for m in ({"role": "user", "content": user},
                                                               {"role": "assistant", "content": answer})]
            files[2].write(json.dumps({"messages": messages}) + "\n")
    files[0].write("\n]\n")
    for f in files:
        f.close()
    return paths


def texts_of(paths: list[Path]) -> list[str]:
    """Each record's prompt and response texts, formatted by plain string formatting (ChatML-like for chats)."""
    from instructune.data.sources import read_json_records

    texts = []
    for path in paths:
        for _, row in read_json_records(path):
            if "instruction" in row:
                texts += [ALPACA_PROMPT.format(row["instruction"] + "\n\n" + row["input"]), row["output"]]
            else:
                turns = row.get("conversations") or row.get("messages")
                texts += [f"<|im_start|>{t.get('from') or t.get('role')}\n{t.get('value') or t.get('content')}"
                          "<|im_end|>\n" for t in turns]
    return texts


def tokenize_part(texts: list[str], rust: bool) -> int:
    """Tokens in `texts`, 1,000 a call: through the tokenizer's call, or its Rust backend alone (`rust`)."""
    from instructune.modeling.builtin import builtin_model_path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(builtin_model_path("smollm2-135m"))
    if rust:
        return sum(len(e.ids) for start in range(0, len(texts), 1000) for e in
                   tokenizer.backend_tokenizer.encode_batch_fast(texts[start:start + 1000], add_special_tokens=False))
    return sum(len(ids) for start in range(0, len(texts), 1000)
               for ids in tokenizer(texts[start:start + 1000], add_special_tokens=False)["input_ids"])


def reference(paths: list[Path], records: int, rust: bool) -> float:
    """Records/s of the raw tokenizer on the records' texts in WORKERS processes."""
    texts = texts_of(paths)
    parts = [(texts[i::WORKERS], rust) for i in range(WORKERS)]
    with Pool(WORKERS) as pool:
        pool.starmap(tokenize_part, [(part[:2000], rust) for part, _ in parts])  # each worker's tokenizer loaded, warm
        started = time.perf_counter()
        pool.starmap(tokenize_part, parts)
        return records / (time.perf_counter() - started)


def raw_tokenizer(folder: Path, records: int) -> tuple[float, float]:
    """(backend, call) records/s of the raw tokenizer on the mix in `folder`."""
    texts = sorted(folder.iterdir())
    return reference(texts, records, rust=True), reference(texts, records, rust=False)


def child_prepare(folder: Path, cache: Path) -> None:
    """In its own process, for its peak RSS: prepare the mix and print the figures as JSON."""
    import logging

    from instructune.data.cache import Encoding, prepare
    from instructune.data.sources import DatasetSpec
    from instructune.modeling import models
    from instructune.modeling.builtin import builtin_model_path

    shards, read = [], []

    class Shards(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("tokenised rows"):
                shards.append((time.perf_counter() - started, record.args[1] - record.args[0]))
            elif record.getMessage().startswith("read "):
                read.append(time.perf_counter() - started)

    logging.getLogger("instructune").addHandler(Shards())
    logging.getLogger("instructune").setLevel(logging.INFO)
    tokenizer = models.load_tokenizer(str(builtin_model_path("smollm2-135m")))
    models.add_missing_special_tokens(tokenizer, "[PAD]")
    specs = [DatasetSpec(str(p)) for p in sorted(folder.iterdir())]
    started = time.perf_counter()
    prepared = prepare(specs, tokenizer, Encoding("alpaca", MAX_LENGTH), cache_dir=cache, workers=WORKERS)
    elapsed = time.perf_counter() - started
    tokens = sum(f.stat().st_size for f in prepared.folder.glob("tokens-*.arrow"))
    entry = sum(f.stat().st_size for f in prepared.folder.iterdir())
    token_count = int(prepared.rows.data.column("length").to_numpy().sum())
    tenth = elapsed / 10
    per_tenth = [sum(rows for at, rows in shards if k * tenth <= at < (k + 1) * tenth) / tenth for k in range(10)]
    print(json.dumps({"seconds": elapsed, "records": prepared.stats.records, "tenths_records_per_s": per_tenth,
                      "read_s": read[0], "tokens": token_count,
                      "token_bytes": tokens, "entry_bytes": entry, "hit": prepared.hit,
                      "rss_self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "rss_children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))


def run(*command, **env) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **env})
    if done.returncode:
        sys.exit(f"failed: {' '.join(map(str, command))}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done


def pack_and_group(cache: Path) -> tuple[float, float, int]:
    import numpy as np
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from instructune.data.batching import pack

    import datasets
    entries = [p for p in cache.iterdir() if p.is_dir() and "." not in p.name]  # the mix's, and the 100 records'
    entry = max(entries, key=lambda p: sum(f.stat().st_size for f in p.iterdir()))
    rows = datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for p in sorted(entry.glob("tokens-*"))])
    lengths = rows.data.column("length").to_numpy()
    lengths = lengths[lengths > 0]
    started = time.perf_counter()
    pack(lengths, MAX_LENGTH)
    pack_s = time.perf_counter() - started
    started = time.perf_counter()
    list(LengthGroupedSampler(8, lengths=lengths.tolist(), generator=torch.Generator().manual_seed(0)))
    return pack_s, time.perf_counter() - started, len(np.asarray(lengths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "CACHE"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        return child_prepare(Path(options.child[0]), Path(options.child[1]))
    if not SHARED.exists():
        sys.exit(f"skipped: {SHARED} is absent (the shared data folder is not beside the repo)")
    work = Path(tempfile.mkdtemp(prefix="instructune-data-scale-"))
    python, results = sys.executable, {}
    try:
        sizes = sorted(options.sizes)
        largest, smallest = sizes[-1], sizes[0]
        references = []  # the raw tokenizer's (backend, call) records/s, just before the largest run and just after
        for size in sizes:
            folder = work / f"mix-{size}"
            started = time.perf_counter()
            paths = generate(folder, size)
            megabytes = sum(p.stat().st_size for p in paths) / 1e6
            print(f"{size:,} records generated ({megabytes:,.0f} MB of JSON) in {time.perf_counter() - started:.0f} s",
                  flush=True)
            if size == largest:
                references.append(raw_tokenizer(work / f"mix-{smallest}", smallest))
            _, done = run(python, __file__, "--child", folder, work / f"cache-{size}")
            results[size] = figures = json.loads(done.stdout.strip().splitlines()[-1])
            rss = (figures["rss_self_kb"] + figures["rss_children_kb"]) / 2**20
            print(f"  prepared in {figures['seconds']:.0f} s: {size / figures['seconds']:,.0f} records/s; peak RSS "
                  f"{figures['rss_self_kb'] / 2**20:.2f} GB + worker {figures['rss_children_kb'] / 2**20:.2f} GB = "
                  f"{rss:.2f} GB; {figures['token_bytes'] / figures['tokens']:.2f} bytes per token "
                  f"({figures['entry_bytes'] / 1e6:,.0f} MB entry with the conversations)", flush=True)
        references.append(raw_tokenizer(work / f"mix-{smallest}", smallest))
        big = results[largest]
        print(f"  the largest run: reading, converting and deduplicating done after {big['read_s']:.0f} s (one "
              "process, while others tokenise); records tokenised per second, per tenth of the run: " +
              ", ".join(f"{r:,.0f}" for r in big["tenths_records_per_s"]))

        raw, call = (sum(measures) / len(measures) for measures in zip(*references))
        ours = largest / big["seconds"]
        prep_ratio = ours / raw
        print(f"raw tokenizer ({WORKERS} processes; the mean of a measure just before the largest run and one just after: "
              + " and ".join(f"{r:,.0f}" for r, _ in references) + f"): {raw:,.0f} records/s through its Rust backend "
              f"(encode_batch_fast), {call:,.0f} through its call (tokenizer(texts)); ours at {largest:,}: {ours:,.0f} "
              f"records/s: {prep_ratio:.2f} of the backend's, {ours / call:.2f} of the call's", flush=True)

        def peak(size):
            return (results[size]["rss_self_kb"] + results[size]["rss_children_kb"]) / 2**20

        slope = (peak(largest) - peak(smallest)) * 2**20 / (largest - smallest) if largest > smallest else float("nan")
        print("peak RSS: " + ", ".join(f"{size:,}: {peak(size):.2f} GB" for size in sizes) +
              f"; slope {slope:.3f} kB per record")

        mix = sorted((work / f"mix-{largest}").iterdir())
        small = work / "small.json"
        small.write_text(json.dumps(base_records()[:100]))
        cache = work / f"cache-{largest}"
        common = ["--model_name_or_path", "smollm2-135m", "--max_steps", "1", "--per_device_train_batch_size", "1",
                  "--model_max_length", str(MAX_LENGTH), "--save_strategy", "no", "--report_to", "none",
                  "--tokenized_cache_dir", str(cache), "--use_cpu", "True"]
        run(python, "train.py", "--data_path", small, "--output_dir", work / "warm-small", *common)  # its cache warm
        small_s, _ = run(python, "train.py", "--data_path", small, "--output_dir", work / "warm-small2", *common)
        big_s, done = run(python, "train.py", "--datasets", ",".join(map(str, mix)), "--output_dir", work / "warm-big",
                          *common)
        assert "cache hit" in done.stderr, done.stderr[-2000:]
        warm_start = big_s - small_s
        print(f"warm start: {big_s:.1f} s to the first step with {largest:,} records cached, {small_s:.1f} s with "
              f"100: {warm_start:.1f} s for the data")

        pack_s, group_s, examples = pack_and_group(cache)
        print(f"packing {examples:,} examples (best fit decreasing): {pack_s:.1f} s; length grouping: {group_s:.1f} s")

        inspect_s, done = run(python, "-m", "instructune.cli", "data", "inspect", *mix, "--model_max_length",
                              str(MAX_LENGTH), "--tokenized_cache_dir", cache)
        assert f"{largest} records" in done.stdout, done.stdout[-2000:]
        print(f"data inspect of the {largest:,} mix from the cache: {inspect_s:.1f} s")
        print(f"prep_ratio={prep_ratio:.2f} prep_ratio_call={ours / call:.2f} peak_rss_gb={peak(largest):.2f} rss_slope_kb_per_record={slope:.3f} "
              f"warm_start_s={warm_start:.1f} pack_s={max(pack_s, group_s):.1f} inspect_s={inspect_s:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
