"""Useful (target) tokens per second of Stanford Alpaca's pipeline and of ours, same model, data, batch and optimizer.

The reference does what Alpaca's train.py does: each example tokenised on its own (`source`, then
`source + target`), random batches padded to the longest, the model's own loss over every position.
Ours: tokenised in batches and cached; logits and loss at target positions only and AdamW in one
fused kernel, on padded batches (instructune's default), padding-free batches (the same examples per
step, flattened) and packed rows (best fit decreasing); and two ablations of padding-free that undo
one thing each (all logits; AdamW stepped tensor by tensor, as Alpaca's adamw_torch).
Every pipeline trains SmolLM2-135M (the built-in model; --model: another with SmolLM2's tokenizer) for one epoch over the same fixed subset of
`../shared/data/random_9k.json` with AdamW, in one process, one after another, and is measured by the
same speed meter (instructune/training/speed.py: steady state after 2 warm-up steps). Tokenisation is timed on
all 9,229 records (--records N: the first N): the reference loop, our cold (cache miss) and warm (cache hit) runs.

    .venv/bin/python bench/throughput.py                         # ~12 minutes on 2 CPU cores
    .venv/bin/python bench/throughput.py --examples 64 --pipelines reference padding_free
    On a GPU machine the same command trains in bf16 (flash attention if importable, else sdpa).

Last line, machine-readable: useful_tokens_per_s_ratio (padding-free over reference), packing_ratio (packed rows,
--batch_size rows a step, over reference), padding_ours,
padding_ref, tokenize_cold_ratio (reference time over our cold time), tokenize_warm_s, mfu (padding-free).
"""

import argparse
import copy
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from instructune.modeling import models  # noqa: E402
from instructune.data import IGNORE_INDEX, DatasetSpec  # noqa: E402
from instructune.data.batching import Collator, pack  # noqa: E402
from instructune.data.cache import Encoding, conversations, prepare  # noqa: E402
from instructune.data.encode import example  # noqa: E402
from instructune.data.templates import ALPACA_NO_INPUT, ALPACA_WITH_INPUT  # noqa: E402
from instructune.training.speed import SpeedMeter  # noqa: E402
from instructune.training.trainer import InstructTrainer, target_token_loss  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "random_9k.json"
# reference: Alpaca's. Then ours, and ablations of ours that undo one thing each.
PIPELINES = ["reference", "padded", "padding_free_all_logits", "padding_free_foreach_adamw", "padding_free", "packing"]


def alpaca_tokenise(records: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Stanford Alpaca's preprocess(): one tokenizer call per source and per source + target, labels masked by
    the source's length."""
    def tokenize(text):
        return tokenizer(text, return_tensors="pt", padding="longest", max_length=max_length, truncation=True).input_ids[0]

    examples = []
    for r in records:
        pattern = ALPACA_WITH_INPUT if r.get("input") else ALPACA_NO_INPUT
        source = pattern.format(instruction=r["instruction"], input=r.get("input", ""))
        ids = tokenize(source + r["output"] + tokenizer.eos_token)
        labels = ids.clone()
        labels[: len(tokenize(source))] = IGNORE_INDEX
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def alpaca_collate(tokenizer):
    """Alpaca's DataCollatorForSupervisedDataset, with the mask taken from the lengths (Alpaca's ne(pad) would
    also mask SmolLM2's EOS, whose id is the pad id: that is a correctness bug, not a speed difference)."""
    def collate(examples):
        ids = torch.nn.utils.rnn.pad_sequence([e["input_ids"] for e in examples], batch_first=True,
                                              padding_value=tokenizer.pad_token_id)
        labels = torch.nn.utils.rnn.pad_sequence([e["labels"] for e in examples], batch_first=True,
                                                 padding_value=IGNORE_INDEX)
        mask = torch.zeros_like(ids)
        for row, e in enumerate(examples):
            mask[row, : len(e["input_ids"])] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
    return collate


def train_speed(name: str, model_path: str, tokenizer, dataset, collator, batch_size: int, fused: bool,
                loss_func, flat: bool, bf16: bool, attention: str | None = None, compile: bool = False) -> dict:
    gpu = torch.cuda.is_available()
    bf16 = bf16 or gpu
    if attention is None:
        import importlib.util

        attention = "flash_attention_2" if gpu and importlib.util.find_spec("flash_attn") else "sdpa"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                              attn_implementation=attention)
    with tempfile.TemporaryDirectory() as output_dir:
        args = transformers.TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=batch_size, num_train_epochs=1, learning_rate=2e-5,
            optim="adamw_torch_fused" if fused else "adamw_torch", lr_scheduler_type="constant", logging_steps=1,
            save_strategy="no", report_to=[], use_cpu=not gpu, bf16=bf16, seed=42, disable_tqdm=True,
            remove_unused_columns=False, torch_compile=compile)
        trainer = InstructTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                                  processing_class=tokenizer, compute_loss_func=loss_func,
                                  speed=SpeedMeter(model, args.device, bf16=bf16), flat_batches=flat)
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # a line per step: the summary suffices
        started = time.perf_counter()
        trainer.train()
        trainer.speed.take_window()
        speed = trainer.speed.summary()
    speed.update(name=name, steps=trainer.state.global_step, wall_s=time.perf_counter() - started,
                 attention=attention, dtype="bf16" if bf16 else "fp32", torch_compile=compile)
    print(f"  {name}: {speed['steps']} steps, {speed['target_tokens_per_second']:.0f} target tokens/s, "
          f"{speed['tokens_per_second']:.0f} tokens/s, padding {speed['padding_fraction']:.1%}, "
          f"MFU {speed.get('mfu', float('nan')):.1%}, {speed['wall_s']:.0f} s in all", flush=True)
    return speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a model folder with SmolLM2's tokenizer (such as "
                        "bench/random_model.py makes) instead of SmolLM2-135M")
    parser.add_argument("--examples", type=int, default=128, help="training examples, a fixed random subset")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--pipelines", nargs="+", default=PIPELINES, choices=PIPELINES)
    parser.add_argument("--records", type=int, default=10**9, help="tokenise only the first N records of the data "
                        "(and draw the training examples from them): a shorter run")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--bf16", action="store_true", help="on the CPU, train in bf16 autocast (fast on CPUs with AMX "
                        "or AVX-512-BF16; a GPU always trains in bf16); MFU is then against the measured bf16 peak")
    parser.add_argument("--attention", choices=["sdpa", "eager", "flex_attention", "flash_attention_2"], default=None,
                        help="attention implementation of our pipelines (default: flash-attention on a GPU that has it, "
                        "else sdpa); the reference keeps the default")
    parser.add_argument("--torch_compile", action="store_true", help="compile our pipelines' models (torch.compile)")
    options = parser.parse_args()
    if not DATA.exists():
        sys.exit(f"skipped: {DATA} is absent (the shared data folder is not beside the repo)")
    torch.manual_seed(0)
    model_path = models.resolve_model_path(options.model)
    tokenizer = models.load_tokenizer(model_path)
    models.add_missing_special_tokens(tokenizer, "[PAD]")
    work = Path(tempfile.mkdtemp(prefix="instructune-bench-"))  # the cache, and a file of the first N records
    data = DATA
    records = json.loads(DATA.read_text())
    if options.records < len(records):
        records = records[: options.records]
        data = work / f"first_{options.records}.json"
        data.write_text(json.dumps(records))
    specs = [DatasetSpec(str(data))]

    print(f"tokenising {len(records)} records ({data.name}), SmolLM2's tokenizer, max length {options.max_length}")
    started = time.perf_counter()
    alpaca_tokenise(records, tokenizer, options.max_length)
    reference_s = time.perf_counter() - started
    cache = work / "cache"
    try:
        timings = []
        for _ in ("cold", "warm"):
            started = time.perf_counter()
            prepared = prepare(specs, tokenizer, Encoding("alpaca", options.max_length), dedup=False,  # as Alpaca
                               cache_dir=cache)
            timings.append(time.perf_counter() - started)
        sources = [json.loads(row)["source"] for row in conversations(prepared.folder)["conversation"]]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cold_s, warm_s = timings
    print(f"  reference (one call per text): {reference_s:.2f} s; ours: cold {cold_s:.2f} s, warm {warm_s:.2f} s "
          f"(cold {reference_s / cold_s:.1f}× faster)")

    chosen = sorted(random.Random(0).sample(range(len(records)), options.examples))
    usable = [i for i in chosen if records[i]["output"].strip()]  # the same records in both pipelines
    reference_examples = alpaca_tokenise([records[i] for i in usable], tokenizer, options.max_length)
    position = {source: n for n, source in enumerate(sources)}
    ours = [example(prepared.rows[position[f"{data}: record {i}"]]) for i in usable]
    ours = [{k: e[k] for k in ("input_ids", "labels")} for e in ours]
    # The same records; a few differ by a token where Alpaca tokenises prompt and response as one text.
    reference_tokens, our_tokens = (sum(len(e["input_ids"]) for e in s) for s in (reference_examples, ours))
    assert abs(reference_tokens - our_tokens) < 0.01 * reference_tokens, (reference_tokens, our_tokens)

    print(f"training 1 epoch on {len(usable)} examples, batch {options.batch_size}, AdamW, "
          f"{'bf16 on ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ('bf16' if options.bf16 else 'fp32') + ' on the CPU'}")
    results = {}
    for name in options.pipelines:
        if name == "reference":  # Alpaca: padded batches, every position's logits, AdamW stepped tensor by tensor
            results[name] = train_speed(name, model_path, tokenizer, reference_examples, alpaca_collate(tokenizer),
                                        options.batch_size, False, None, False, options.bf16)
            continue
        target_only, flat = name != "padding_free_all_logits", name != "padded"
        collator = Collator(tokenizer, flatten=flat, target_logits_only=target_only)
        dataset, batch = copy.copy(ours), options.batch_size
        if name == "packing":  # rows of max_length tokens, --batch_size rows a step (as train.py --packing)
            groups, fill = pack([len(e["input_ids"]) for e in ours], options.max_length)
            dataset = [[ours[i] for i in group] for group in groups]
            print(f"  packing: {len(ours)} examples into {len(dataset)} rows, {fill:.1%} full")
        results[name] = train_speed(name, model_path, tokenizer, dataset, collator, batch, name != "padding_free_foreach_adamw",
                                    target_token_loss if target_only else None, flat, options.bf16, options.attention,
                                    options.torch_compile)

    reference = results.get("reference")
    best = results.get("padding_free")
    if reference:
        print("\nuseful (target) tokens/s as a ratio to the reference:")
        for name, r in results.items():
            print(f"  {name:26s} {r['target_tokens_per_second'] / reference['target_tokens_per_second']:5.2f}×  "
                  f"padding {r['padding_fraction']:.1%}  MFU {r.get('mfu', float('nan')):.1%}")
    if options.json:
        Path(options.json).write_text(json.dumps({"tokenize": {"reference_s": reference_s, "cold_s": cold_s,
                                                                "warm_s": warm_s}, "train": results}, indent=1))
    if reference and best:
        packing = results.get("packing")
        packing_ratio = packing["target_tokens_per_second"] / reference["target_tokens_per_second"] if packing else 0.0
        print(f"useful_tokens_per_s_ratio={best['target_tokens_per_second'] / reference['target_tokens_per_second']:.2f} "
              f"packing_ratio={packing_ratio:.2f} "
              f"padding_ours={best['padding_fraction']:.3f} padding_ref={reference['padding_fraction']:.3f} "
              f"tokenize_cold_ratio={reference_s / cold_s:.2f} tokenize_warm_s={warm_s:.2f} mfu={best.get('mfu', 0):.3f}")


if __name__ == "__main__":
    main()
