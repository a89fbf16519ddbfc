"""Test assets built on the spot: a byte-level BPE tokenizer trained on the sample data, and tiny random
LLaMA (no pad token, untied embeddings, like the real LLaMA) and OPT (pad token, tied embeddings) folders."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "alpaca_data.json"
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _train_tokenizer(directory: Path, with_pad: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    records = json.loads(SAMPLE_DATA.read_text())
    texts = [" ".join(r.values()) for r in records] * 2
    specials = ["<unk>", "<s>", "</s>"] + (["<pad>"] if with_pad else [])
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    # Like LLaMA: BOS in front of every encoded text.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>" if with_pad else None,
    )
    wrapped.save_pretrained(directory)
    return wrapped


def _tiny_model(directory: Path, with_pad: bool, config_class: str, **sizes) -> Path:
    import torch
    import transformers

    tokenizer = _train_tokenizer(directory, with_pad=with_pad)
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """LLaMA-like: no pad token, untied embeddings."""
    return _tiny_model(tmp_path_factory.mktemp("tiny-llama"), False, "LlamaConfig", hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory) -> Path:
    """OPT: a pad token, tied embeddings."""
    return _tiny_model(tmp_path_factory.mktemp("tiny-opt"), True, "OPTConfig", hidden_size=64, ffn_dim=128,
                       num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The built-in SmolLM2-135M-Instruct folder (converted into the user cache on first use)."""
    from instructune.modeling.builtin import builtin_model_path

    return builtin_model_path("smollm2-135m")


def run_command(args: list[str], timeout: int = 600, cwd: Path = REPO, **env) -> subprocess.CompletedProcess:
    """Run a command (from the repo root unless told) with this interpreter's environment; output captured as text."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        args, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


PYTHON = sys.executable
SCRIPTS = Path(PYTHON).parent  # this interpreter's console scripts (its venv's bin/): never another venv's


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(model, *flags, **env) -> tuple[subprocess.Popen, int]:
    """`instructune serve --model MODEL FLAGS` on a free port of 127.0.0.1, once its page answers: (process, port)."""
    import http.client
    import time

    port = free_port()
    process = subprocess.Popen([PYTHON, "-m", "instructune.cli", "serve", "--model", str(model), "--port", str(port),
                                *flags], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "2", **env},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("GET", "/")
            if connection.getresponse().status == 200:
                return process, port
        except OSError:
            time.sleep(0.5)
    process.kill()
    pytest.fail("the server did not come up in 180 s")


SRUN = 'while [ "${1#-}" != "$1" ]; do shift; done; exec "$@"'  # a stand-in srun: options dropped, the task run here


def stand_ins(folder: Path, **bodies: str) -> str:
    """Executable stand-ins (bash bodies) for commands that cannot run here (Slurm's srun, scontrol, scancel), in
    `folder`; returns a PATH that finds them first."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in bodies.items():
        (folder / name).write_text(f"#!/bin/bash\n{body}\n")
        (folder / name).chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


@pytest.fixture(autouse=True)
def fast_tier_trains_nothing(request, monkeypatch):
    """The fast tier (`-m "not slow"`) stays under a minute because nothing in it trains (a forward is fine): a test
    that reaches the Trainer's loop without the `slow` mark fails here, naming the mark it needs."""
    if request.node.get_closest_marker("slow") is None:
        def refuse(*args, **kwargs):
            raise AssertionError(f"{request.node.nodeid} trains a model: mark it @pytest.mark.slow (fast tier)")

        monkeypatch.setattr("transformers.trainer.Trainer.train", refuse)


@pytest.fixture(scope="session")
def ranks(tmp_path_factory):
    """Two gloo ranks for the whole run, handed 2-process jobs: `ranks.torchrun(SCRIPT, *ARGS)` (rank_pool.py)."""
    from rank_pool import RankPool

    pool = RankPool(tmp_path_factory.mktemp("rank-pool"))
    yield pool
    pool.stop()


def assert_same_tensors(got: dict, expected: dict, tolerance: float = 0.0) -> None:
    """Same non-empty set of names, and every tensor equal (bitwise, or within `tolerance`)."""
    import torch

    assert expected and got.keys() == expected.keys(), sorted(set(got) ^ set(expected))[:5]
    for name, tensor in expected.items():
        if tolerance:
            assert (got[name] - tensor).abs().max() <= tolerance, name
        else:
            assert torch.equal(got[name], tensor), name


def training_loss(model, tokenizer, count: int = 16) -> float:
    """Mean loss of `model` on the first `count` sample records, as trained (Alpaca template, masked prompt)."""
    import torch

    from instructune.data import encode_conversations, load_conversations

    examples, _ = encode_conversations(load_conversations(str(SAMPLE_DATA))[:count], tokenizer, "alpaca", 256)
    with torch.no_grad():
        losses = [model(**{k: torch.tensor([v]) for k, v in e.items()}).loss for e in examples]
    return float(torch.stack(losses).mean())


# A multiple-choice lm-eval task over a local JSONL (the hub is unreachable): eval's and serve's tests.
MC_QUESTIONS = [("What colour is the sky?", ["blue", "green", "red"], 0), ("How many legs has a dog?", ["two", "four", "six"], 1),
                ("Name the capital of France.", ["Berlin", "Madrid", "Paris"], 2), ("Which animal says moo?", ["cow", "cat", "duck"], 0),
                ("What is frozen water?", ["steam", "ice", "sand"], 1), ("Which is a fruit?", ["carrot", "potato", "apple"], 2),
                ("Give an even number.", ["three", "five", "eight"], 2), ("What do bees make?", ["honey", "milk", "silk"], 0)]
MC_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def write_mc_task(folder: Path, name: str) -> Path:
    """folder/NAME.yaml over folder/NAME.jsonl (MC_QUESTIONS); returns the folder, lm-eval's include path."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "choices": c, "answer": a}) for q, c, a in MC_QUESTIONS))
    (folder / f"{name}.yaml").write_text(MC_YAML.format(name=name, data=data))
    return folder
