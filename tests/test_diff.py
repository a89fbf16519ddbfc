"""Weight diffs: round trips (bitwise with --exact), Alpaca's format both ways, a wrong base or a damaged
shard refused and named, and no output folder unless recovery completed."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from instructune.checkpoint import diff
from instructune.checkpoint.tensorio import ShardWriter, TensorFolder
from instructune.cli import main
from instructune.errors import UserError

from conftest import PYTHON, assert_same_tensors, run_command


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    reader = TensorFolder(folder)
    return {name: reader.get(name) for name in reader.names()}


def alpaca_resize(model, tokenizer):
    """Stanford Alpaca's smart_tokenizer_and_embedding_resize with its '[PAD]' token."""
    added = tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if added > 0:
        for weight in (model.get_input_embeddings().weight.data, model.get_output_embeddings().weight.data):
            weight[-added:] = weight[:-added].mean(dim=0, keepdim=True)


def make_tuned(raw: Path, out: Path, seed: int = 0, safe: bool = True) -> Path:
    """A 'fine-tuned' model: '[PAD]' added as Alpaca does (if the tokenizer lacks a pad), every weight moved."""
    model = AutoModelForCausalLM.from_pretrained(raw, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(raw)
    if tokenizer.pad_token is None:
        alpaca_resize(model, tokenizer)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 1e-2)
    model.save_pretrained(out, max_shard_size="300KB", safe_serialization=safe)
    tokenizer.save_pretrained(out)
    return out


def alpaca_models(path_raw, path_other):
    """Both models as Alpaca's weight_diff.py loads them: fp32, the raw one given '[PAD]' if it has no pad."""
    other = AutoModelForCausalLM.from_pretrained(path_other, dtype=torch.float32)
    raw = AutoModelForCausalLM.from_pretrained(path_raw, dtype=torch.float32)
    raw_tokenizer = AutoTokenizer.from_pretrained(path_raw)
    if raw_tokenizer.pad_token is None:
        alpaca_resize(raw, raw_tokenizer)
    return other, other.state_dict(), raw.state_dict()


def alpaca_make_diff(path_raw, path_tuned, path_diff):
    """Alpaca's make_diff (two fp32 models in memory)."""
    tuned, tuned_state, raw_state = alpaca_models(path_raw, path_tuned)
    for key in tuned_state:
        tuned_state[key].add_(-raw_state[key])
    tuned.save_pretrained(path_diff)
    AutoTokenizer.from_pretrained(path_tuned).save_pretrained(path_diff)


def alpaca_recover(path_raw, path_diff) -> dict[str, torch.Tensor]:
    """Alpaca's recover, returning the recovered state dict."""
    _, state, raw_state = alpaca_models(path_raw, path_diff)
    for key in state:
        state[key].add_(raw_state[key])
    return state


@pytest.fixture(params=["tiny_llama", "tiny_opt"])
def raw_and_tuned(request, tmp_path):
    raw = request.getfixturevalue(request.param)
    return raw, make_tuned(raw, tmp_path / "tuned")


def test_shard_writer_streams_valid_safetensors_shards(tmp_path):
    tensors = {"a": torch.randn(100, 30), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(50, dtype=torch.int32), "d": torch.randn(3, 3)}
    writer = ShardWriter(tmp_path, [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], "12KB")
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    loaded = {}
    for shard in set(index["weight_map"].values()):
        loaded.update(load_file(tmp_path / shard))
    assert_same_tensors(loaded, tensors)


@pytest.mark.parametrize("exact, dtype", [(False, "fp32"), (False, "bf16"), (True, "fp32")], ids=["float", "bf16", "exact"])
def test_round_trip(raw_and_tuned, tmp_path, exact, dtype):
    raw, tuned = raw_and_tuned
    report = diff.make_diff(raw, tuned, tmp_path / "diff", exact=exact, dtype=dtype, max_shard_size="200KB")
    manifest = json.loads((tmp_path / "diff" / diff.MANIFEST).read_text())
    assert manifest["encoding"] == ("exact" if exact else "float")
    assert (tmp_path / "diff" / "model.safetensors.index.json").exists()  # sharded
    recovered = diff.recover(raw, tmp_path / "diff", tmp_path / "recovered")
    assert recovered.tensors == report.tensors
    expected, got = load_weights(tuned), load_weights(tmp_path / "recovered")
    if exact:
        assert report.max_abs_error == 0.0
        assert_same_tensors(got, expected)
    else:  # the round-off that make_diff reports is the one recovery really has: measured here, independently
        assert got.keys() == expected.keys() and expected
        measured = max((got[name] - expected[name]).abs().max().item() for name in expected)
        assert report.max_abs_error == measured
        assert measured < 1e-6 if dtype == "fp32" else 1e-5 < measured < 1e-2  # a bf16 diff loses precision
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "recovered")  # a complete folder
    assert len(AutoTokenizer.from_pretrained(tmp_path / "recovered")) == model.get_input_embeddings().weight.shape[0]


def test_added_vocabulary_rows_are_recorded(tiny_llama, tmp_path):
    tuned = make_tuned(tiny_llama, tmp_path / "tuned")
    diff.make_diff(tiny_llama, tuned, tmp_path / "diff")
    entries = json.loads((tmp_path / "diff" / diff.MANIFEST).read_text())["tensors"]
    assert entries["model.embed_tokens.weight"]["added_rows"] == 1 and entries["lm_head.weight"]["added_rows"] == 1
    assert entries["model.norm.weight"]["added_rows"] == 0


def test_alpaca_format_both_ways(tiny_llama, tmp_path):
    tuned = make_tuned(tiny_llama, tmp_path / "tuned", safe=False)  # .bin input, read with weights_only
    alpaca_make_diff(tiny_llama, tuned, tmp_path / "alpaca-diff")
    # Alpaca's diff folder recovers exactly as Alpaca's own script does.
    diff.recover(tiny_llama, tmp_path / "alpaca-diff", tmp_path / "recovered")
    reference, ours = alpaca_recover(tiny_llama, tmp_path / "alpaca-diff"), load_weights(tmp_path / "recovered")
    assert_same_tensors(ours, reference)
    # Our default diff holds the same tensors as Alpaca's, so Alpaca's script recovers it too.
    diff.make_diff(tiny_llama, tuned, tmp_path / "our-diff")
    assert_same_tensors(load_weights(tmp_path / "our-diff"), load_weights(tmp_path / "alpaca-diff"))
    assert_same_tensors(alpaca_recover(tiny_llama, tmp_path / "our-diff"), ours)


def test_naive_sum_check(tiny_llama, tmp_path):
    tuned = make_tuned(tiny_llama, tmp_path / "tuned")
    diff.make_diff(tiny_llama, tuned, tmp_path / "diff")
    checked = diff.recover(tiny_llama, tmp_path / "diff")  # no output: only checks
    diff.recover(tiny_llama, tmp_path / "diff", tmp_path / "ok", expected_sum=checked.weight_sum)
    with pytest.raises(UserError, match="naive integrity check failed"):
        diff.recover(tiny_llama, tmp_path / "diff", tmp_path / "bad", expected_sum=checked.weight_sum + 1)
    assert not (tmp_path / "bad").exists()


def test_wrong_base_is_refused_before_writing(tiny_llama, tmp_path):
    tuned = make_tuned(tiny_llama, tmp_path / "tuned")
    diff.make_diff(tiny_llama, tuned, tmp_path / "diff")
    wrong = tmp_path / "wrong-base"
    shutil.copytree(tiny_llama, wrong)
    weights = load_file(wrong / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][0, 0] += 1e-3
    save_file(weights, wrong / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError) as error:
        diff.recover(wrong, tmp_path / "diff", tmp_path / "out")
    assert str(error.value).startswith("tensor model.layers.1.mlp.up_proj.weight: base does not match")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diff", "tuned", "wrong-base"]


def test_damaged_diff_shard_is_named(tiny_llama, tmp_path):
    tuned = make_tuned(tiny_llama, tmp_path / "tuned")
    diff.make_diff(tiny_llama, tuned, tmp_path / "diff", max_shard_size="200KB")
    shard = sorted((tmp_path / "diff").glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01  # one flipped bit in the tensor data
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError) as error:
        diff.recover(tiny_llama, tmp_path / "diff", tmp_path / "out")
    assert str(error.value).startswith(f"{shard}: damaged diff shard (tensor ")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_interrupted_recover_leaves_no_output(tiny_llama, tmp_path, monkeypatch):
    tuned = make_tuned(tiny_llama, tmp_path / "tuned")
    diff.make_diff(tiny_llama, tuned, tmp_path / "diff")
    written = []

    def write_then_interrupt(self, name, tensor):
        written.append(name)
        if len(written) == 5:
            raise KeyboardInterrupt
        original(self, name, tensor)

    original = ShardWriter.write
    monkeypatch.setattr(ShardWriter, "write", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        diff.recover(tiny_llama, tmp_path / "diff", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_mismatched_models_are_one_line_errors(tiny_llama, tiny_opt, tmp_path):
    with pytest.raises(UserError, match="mismatched architectures: .* is 'llama', .* is 'opt'"):
        diff.make_diff(tiny_llama, tiny_opt, tmp_path / "diff")
    partial = tmp_path / "partial"
    shutil.copytree(tiny_llama, partial)
    weights = load_file(partial / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="tensor model.norm.weight: missing from the base model"):
        diff.make_diff(partial, tiny_llama, tmp_path / "diff")
    with pytest.raises(UserError, match="no such model folder"):
        diff.make_diff(tmp_path / "nowhere", tiny_llama, tmp_path / "diff")
    assert not (tmp_path / "diff").exists()


@pytest.mark.slow
def test_alpaca_command_lines(tiny_llama, tmp_path, capsys):
    tuned = make_tuned(tiny_llama, tmp_path / "tuned")
    made = run_command([PYTHON, "weight_diff.py", "make_diff", "--path_raw", str(tiny_llama), "--path_tuned", str(tuned),
                        "--path_diff", str(tmp_path / "diff")])
    assert made.returncode == 0, made.stderr[-2000:]
    # weight_diff.py is `instructune diff` (cli.weight_diff_main): the rest of Alpaca's command lines run in-process
    capsys.readouterr()
    assert main(["diff", "recover", "--path_raw", str(tiny_llama), "--path_diff", str(tmp_path / "diff"), "--path_tuned",
                 str(tmp_path / "out"), "--device", "cpu", "--test_inference", "True",
                 "--check_integrity_naively", "False"]) == 0
    recovered = capsys.readouterr().out
    assert "recovered into" in recovered and "Q: List three technologies" in recovered
    assert main(["diff", "verify", "--path_raw", str(tuned), "--path_diff", str(tmp_path / "diff")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: tensor ")


@pytest.mark.slow
def test_smollm2_exact_round_trip(smollm2, tmp_path):
    tuned = tmp_path / "tuned"
    shutil.copytree(smollm2, tuned)
    weights = load_file(tuned / "model.safetensors")
    for name in list(weights)[::10]:
        weights[name] = weights[name] + 1e-3 * torch.randn_like(weights[name])
    save_file(weights, tuned / "model.safetensors", metadata={"format": "pt"})
    diff.make_diff(smollm2, tuned, tmp_path / "diff", exact=True, max_shard_size="200MB")
    diff.recover(smollm2, tmp_path / "diff", tmp_path / "recovered")
    got = load_weights(tmp_path / "recovered")
    assert_same_tensors(got, weights)
