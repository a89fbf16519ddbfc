"""User errors that used to end in a traceback (#20 §7) are one line and exit 2, with nothing written: malformed
--datasets entries, the same file twice, a training length past the model's positions, and `plan` with
impossible hardware, workloads or configs (which never print a plan, let alone "fits")."""

import json

import pytest

from instructune.cli import main

from conftest import SAMPLE_DATA
from test_train import tiny_run_flags


def last_error(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err.strip().splitlines()[-1]


@pytest.mark.parametrize("datasets, expected", [
    (f"{SAMPLE_DATA}:0", f"{SAMPLE_DATA}: 0 of its 125 usable records is none; ask for more or leave it out of --datasets"),
    (f"{SAMPLE_DATA}:0.1%", f"{SAMPLE_DATA}: 0.1% of its 125 usable records is none; ask for more or leave it out of --datasets"),
    ("[oops", "--datasets '[oops': not a JSON list (Expecting value at character 1)"),
    ('{"path": "a.json"}', '{"path": "a.json"}: no such file or folder'),
    (f"{SAMPLE_DATA},{SAMPLE_DATA}:10", f"--datasets: {SAMPLE_DATA} is given twice; name each dataset once (its size "
                                         "says how much of it to take)"),
])
def test_bad_datasets_are_one_line(tiny_llama, tmp_path, capsys, datasets, expected):
    assert main(["train", *tiny_run_flags(tiny_llama, tmp_path / "out", steps=1), "--datasets", datasets]) == 2
    assert last_error(capsys) == f"error: {expected}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fixture", ["tiny_opt", "tiny_llama"])
def test_a_training_length_past_the_models_positions_is_refused(fixture, request, tmp_path, capsys):
    """Seen: --packing on OPT past its 512 positions was an IndexError at step 1; LLaMA trained past its context."""
    model = request.getfixturevalue(fixture)
    flags = tiny_run_flags(model, tmp_path / "out", steps=1)
    flags[flags.index("--model_max_length") + 1] = "1024"
    assert main(["train", *flags, "--packing", "True"]) == 2
    assert last_error(capsys) == (f"error: --model_max_length 1024: longer than {model}'s context (512 positions, "
                                  "max_position_embeddings in its config.json); give at most 512")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--gpus", "0"], "--gpus 0: must be between 1 and 1048576"),
    (["--gpu_mem", "-80"], "--gpu_mem -80: must be between 0.01 and 1048576"),
    (["--cpu_mem", "nan"], "--cpu_mem nan: must be between 0.01 and 1073741824"),
    (["--seq_len", "-512"], "--seq_len -512: must be between 1 and 16777216"),
    (["--micro_batch", "100000000"], "--micro_batch 100000000: must be between 1 and 65536"),
    (["--headroom", "1.5"], "--headroom 1.5: must be between 0 and 0.99"),
])
def test_plan_refuses_impossible_hardware_and_workloads(capsys, flags, expected):
    assert main(["plan", "--model", "llama-2-7b", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == f"error: {expected}" and "fits" not in captured.out


@pytest.mark.parametrize("config, expected", [
    ({}, "{path}: a model config is a JSON object with a model_type"),
    ([1], "{path}: a model config is a JSON object with a model_type"),
    ("{oops", "{path}:1:2: invalid JSON: Expecting property name enclosed in double quotes"),
    ({"model_type": "nonesuch"}, "{path}: model_type 'nonesuch' is no architecture that transformers knows"),
    ({"model_type": "llama", "num_attention_heads": 0},
     "{path}: not a valid config: ZeroDivisionError: integer division or modulo by zero"),
    ({"model_type": "llama", "hidden_size": -64}, "--model {path}: no causal language model can be built from its "
     "config: RuntimeError: Trying to create tensor with negative dimension -64: [32000, -64]"),
    ({"model_type": "llama", "num_hidden_layers": 0}, "--model {path}: its config gives a model of 0 layers and "
     "262148096 parameters"),
])
def test_plan_refuses_configs_no_model_has(tmp_path, capsys, config, expected):
    path = tmp_path / "config.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    assert main(["plan", "--model", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == f"error: {expected.format(path=path)}" and "fits" not in captured.out
