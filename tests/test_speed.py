"""Speed figures: what a batch holds is counted the same padded or flattened, FLOPs count every matmul weight
(the LM head too, once if tied) and attention from the real example lengths, and every run reports them."""

import json
import logging

import pytest
import torch

from instructune.cli import main
from instructune.config.argv import translate_legacy_flags
from instructune.config.device import cpu_has_bf16
from instructune.data import encode_conversations, load_conversations
from instructune.data.batching import Collator
from instructune.modeling import models
from instructune.training.speed import SpeedMeter, matmul_parameters

from conftest import SAMPLE_DATA
from test_train import tiny_run_flags


def meter_and_examples(model_path, count=6):
    tokenizer = models.load_tokenizer(str(model_path))
    models.add_missing_special_tokens(tokenizer, "[PAD]")
    examples, _ = encode_conversations(load_conversations(str(SAMPLE_DATA))[:count], tokenizer, "alpaca", 256)
    model = models.load_model(str(model_path))
    model.resize_token_embeddings(len(tokenizer))
    return SpeedMeter(model, torch.device("cpu")), tokenizer, examples, model


def test_padded_and_flattened_batches_count_the_same_work(tiny_llama):
    meter, tokenizer, examples, _ = meter_and_examples(tiny_llama)
    lengths = [len(e["input_ids"]) for e in examples]
    targets = sum(sum(label != -100 for label in e["labels"][1:]) for e in examples)
    counted = {}
    for flatten in (False, True):
        meter.window.zero_()
        meter.count(Collator(tokenizer, flatten=flatten)([*examples]))
        counted[flatten] = dict(zip(meter.FIELDS, meter.window.tolist()))
    assert counted[True] == {"positions": sum(lengths), "tokens": sum(lengths), "targets": targets,
                             "attention_units": sum(n * n for n in lengths)}
    assert counted[False] == counted[True] | {"positions": max(lengths) * len(lengths)}  # the pads, and only they, differ
    meter.window.zero_()
    meter.count(Collator(tokenizer, flatten=True)([examples[:2], examples[2:3], examples[3:]]))  # packed rows
    rows = [sum(lengths[:2]), lengths[2], sum(lengths[3:])]
    assert dict(zip(meter.FIELDS, meter.window.tolist())) == counted[True] | {"positions": max(rows) * 3}


def test_mfu_counts_the_lm_head_and_attention(tiny_llama, tiny_opt):
    llama = models.load_model(str(tiny_llama))  # untied: the LM head is a matmul of its own
    assert matmul_parameters(llama) == sum(p.numel() for p in llama.parameters()) - llama.model.embed_tokens.weight.numel()
    opt = models.load_model(str(tiny_opt))  # tied: the table is looked up (free) and multiplied (the LM head) once
    assert matmul_parameters(opt) == sum(p.numel() for p in opt.parameters()) - opt.model.decoder.embed_positions.weight.numel()

    meter, _, _, model = meter_and_examples(tiny_llama)
    meter.peak = 1e9
    figures = meter.figures({"positions": 200, "tokens": 100, "targets": 40, "attention_units": 5000, "seconds": 2.0})
    layers, width = model.config.num_hidden_layers, model.config.num_attention_heads * model.config.head_dim
    flops = 6 * matmul_parameters(model) * 100 + 12 * layers * width * 5000
    assert figures == pytest.approx({"tokens_per_second": 50, "target_tokens_per_second": 20, "padding_fraction": 0.5,
                                     "mfu": flops / 2.0 / 1e9})


def test_mfu_is_against_the_peak_of_the_precision_the_run_computes_in(tiny_llama, tmp_path, monkeypatch):
    """A bf16 run on a CPU is measured against the CPU's bf16 matmul rate (several times fp32's with AMX), each
    measured once per CPU model, thread count and dtype, and cached."""
    from instructune.training import speed

    monkeypatch.setenv("INSTRUCTUNE_CACHE", str(tmp_path))
    measured = []
    real = speed.measure_matmul_flops

    def measure(size=1024, seconds=0.5, dtype=torch.float32):
        measured.append(dtype)
        return real(size=128, seconds=0.05, dtype=dtype)

    monkeypatch.setattr(speed, "measure_matmul_flops", measure)
    model = models.load_model(str(tiny_llama))
    fp32, bf16 = SpeedMeter(model, torch.device("cpu")), SpeedMeter(model, torch.device("cpu"), bf16=True)
    assert "fp32 matmul" in fp32.peak_source and "bf16 matmul" in bf16.peak_source
    assert measured == [torch.float32, torch.bfloat16] and fp32.peak > 0 and bf16.peak > 0
    SpeedMeter(model, torch.device("cpu"), bf16=True)
    assert len(measured) == 2  # cached: not measured again
    assert len(json.loads((tmp_path / "cpu_peak_flops.json").read_text())) == 2


@pytest.mark.slow  # trains (the fast tier trains nothing)
def test_every_run_reports_its_speed(tiny_llama, tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="instructune")
    assert main(["train", *tiny_run_flags(tiny_llama, tmp_path / "out", steps=6)]) == 0
    speed = json.loads((tmp_path / "out" / "train_results.json").read_text())["speed"]
    assert speed["tokens_per_second"] > speed["target_tokens_per_second"] > 0
    assert 0 < speed["padding_fraction"] < 1 and 0 < speed["mfu"] < 1
    assert speed["peak_source"].startswith("CPU: measured") and speed["warmup_steps"] == 2
    # the Trainer's own log lines: one per step after the two warm-up steps carries the window's figures
    logged = [line for line in capsys.readouterr().out.splitlines() if "'loss'" in line]
    assert len(logged) == 6 and ["tokens_per_second" in line for line in logged] == [False] * 2 + [True] * 4
    assert "speed:" in caplog.text


def test_group_by_length_is_mapped(caplog):
    caplog.set_level(logging.INFO, logger="instructune")
    assert translate_legacy_flags(["--group_by_length", "True"]) == ["--train_sampling_strategy", "group_by_length"]
    assert translate_legacy_flags(["--group_by_length", "False"]) == []
    assert "--train_sampling_strategy group_by_length" in caplog.text


def test_bf16_without_cpu_support_is_detected(tmp_path):
    without, native = tmp_path / "old", tmp_path / "new"
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    native.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert not cpu_has_bf16(str(without)) and cpu_has_bf16(str(native))


@pytest.mark.slow  # trains (the fast tier trains nothing)
def test_group_by_length_keeps_padding_small(tiny_llama, tmp_path):
    padding = {}
    for name, extra in (("random", []), ("grouped", ["--group_by_length", "True"])):
        assert main(["train", *tiny_run_flags(tiny_llama, tmp_path / name, steps=6), *extra]) == 0
        padding[name] = json.loads((tmp_path / name / "train_results.json").read_text())["speed"]["padding_fraction"]
    assert padding["grouped"] < padding["random"] / 1.5, padding  # sorted within random groups of 3 batches
