"""`instructune data generate` (Self-Instruct): Alpaca's parsing and filters on scripted replies give exactly the
expected tasks; the fast ROUGE-L filter makes the naive filter's decisions (and finds the same nearest score) on
random and adversarial sets; against a scripted OpenAI-compatible server on 127.0.0.1 the command writes the kept
tasks and a summary, and after a SIGKILL the same command asks nothing twice; and it runs against `instructune
serve` with SmolLM2."""

import hashlib
import json
import random
import signal
import subprocess
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from instructune.cli import main
from instructune.data.self_instruct import (PROMPT, THRESHOLD, NoveltyFilter, Reply, Task, encode_prompt, generate,
                                            naive_nearest, parse, rouge_tokens)

from conftest import PYTHON, REPO, SHARED_DATA, launch_server

SEEDS = [Task(f"Seed task number {i}: tell me something about {topic}.", "", f"Something about {topic}.")
         for i, topic in enumerate(["rivers", "mountains", "trees", "deserts", "oceans"])]
WORDS = [f"{a}{b}" for a in ("sun", "moon", "river", "stone", "glass", "wind", "bee", "clock", "salt", "fern", "coral",
                               "tide", "lens", "dune", "comet") for b in ("light", "fall", "ward", "smith", "field", "berg")]


def reply_for(prompt: str) -> tuple[str, str]:
    """A scripted completion continuing the prompt's list (from task 4), decided by the prompt: (text, finish_reason).
    Every kind of task Alpaca's filters meet: novel ones, a near-duplicate, blacklisted words, too short, a program,
    punctuation first, prose between tasks, and (for some prompts) a last task cut off by the length limit."""
    draw = random.Random(hashlib.sha256(prompt.encode()).hexdigest())
    novel = draw.sample(WORDS, 8)
    near = novel[:-1] + ["lifespan"]
    c = draw.choice(WORDS)
    tasks = [f"Explain {' '.join(novel)}.", f"Explain {' '.join(near)}.",  # a near-duplicate: ROUGE-L 0.89
             f"Draw a picture of {c} at sunset.", f"Name {c}.", f"Write a program that counts {c}.",
             f"- List three facts about {c} that a child would find surprising.",
             f"In two sentences, describe {' '.join(draw.sample(WORDS, 9))}."]
    def body(number: int) -> str:
        return f"{number}. Input:\n<noinput>\n{number}. Output:\nAn answer.\n"

    # a completion continues the prompt's "4. Instruction:"; prose after the tasks is in no numbered form
    pieces = [f" {tasks[0]}\n{body(4)}"] + [f"{n}. Instruction: {task}\n{body(n)}" for n, task in enumerate(tasks[1:], 5)]
    text = "###\n".join(pieces) + "###\nThat is all the tasks for now.\n"
    if draw.random() < 0.3:
        return text + "###\n12. Instruction: Explain the way that", "length"
    return text, "stop"


class TaskServer:
    """An OpenAI-compatible server on 127.0.0.1 answering completions and chat completions with reply_for; it counts
    the requests per prompt."""

    def __init__(self, delay: float = 0.0):
        self.delay, self.asked, self.lock = delay, {}, threading.Lock()
        served = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body.get("prompt") or body["messages"][-1]["content"]
                with served.lock:
                    served.asked[prompt] = served.asked.get(prompt, 0) + 1
                time.sleep(served.delay)
                text, finish = reply_for(prompt)
                choice = {"index": 0, "finish_reason": finish,
                          **({"text": text} if "prompt" in body else {"message": {"role": "assistant", "content": text}})}
                raw = json.dumps({"choices": [choice], "usage": {"total_tokens": 100}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_parse_and_filters_keep_exactly_the_expected_tasks():
    prompt = encode_prompt(PROMPT, SEEDS[:3])
    assert prompt.endswith("###\n4. Instruction:") and "3. Input:\n<noinput>\n" in prompt
    text, _ = reply_for(prompt)
    tasks, dropped = parse(text, cut=False)
    instructions = [t.instruction for t in tasks]
    assert len(instructions) == 3 and instructions[0].startswith("Explain") and instructions[1].startswith("Explain")
    assert instructions[2].startswith("In two sentences")
    assert all(t.input == "" and t.output == "An answer." for t in tasks)  # <noinput> is an empty input
    assert dropped == {"a task a text model cannot do": 1, "3 words or fewer, or over 150": 1, "write a program": 1,
                       "starts with punctuation": 1, "not in the numbered form": 1}
    cut_tasks, cut_dropped = parse(text + "###\n11. Instruction: Explain the way that", cut=True)
    assert cut_tasks == tasks and cut_dropped["cut off by the length limit"] == 1
    # a chat reply that restates the number parses the same
    assert parse("4. Instruction:" + text, cut=False)[0] == tasks

    replies = [Reply(text, "stop", 100)]
    result = generate(SEEDS, lambda prompts: replies * len(prompts), wanted=10, batch_size=1, max_requests=1)
    kept = [r["instruction"] for r in result.records]
    assert kept == [instructions[0], instructions[2]]  # the near-duplicate is too similar (ROUGE-L above 0.7)
    assert result.counts["too similar (ROUGE-L above 0.7)"] == 1 and result.tokens_used == 100
    assert result.counts["tasks parsed"] == 7  # the numbered tasks of the reply, before the filters
    assert result.records[1]["similarity"] <= THRESHOLD and result.records[1]["most_similar_instruction"]


def random_instructions(count: int, seed: int) -> list[str]:
    """Instructions over a small vocabulary (so that many pairs are near the threshold), with adversarial ones:
    exact repeats, permutations, one-word changes, repeated tokens, texts with no token at all."""
    draw = random.Random(seed)
    words = "the a of explain list three ways to describe why how river tree stone water light sound".split()
    texts = []
    for _ in range(count):
        kind = draw.random()
        if texts and kind < 0.15:
            texts.append(draw.choice(texts))  # an exact repeat
        elif texts and kind < 0.3:
            tokens = draw.choice(texts).split()
            draw.shuffle(tokens)
            texts.append(" ".join(tokens))
        elif texts and kind < 0.5:
            tokens = draw.choice(texts).split() or ["x"]
            tokens[draw.randrange(len(tokens))] = draw.choice(words)
            texts.append(" ".join(tokens))
        elif kind < 0.53:
            texts.append(draw.choice(["!!!", "", "the the the the the", "?? ...", "water water"]))
        else:
            texts.append(" ".join(draw.choice(words) for _ in range(draw.randint(1, 14))))
    return texts


@pytest.mark.parametrize("seed, count", [(0, 500), pytest.param(1, 1000, marks=pytest.mark.slow)])
def test_the_fast_filter_makes_the_naive_filters_decisions(seed, count):
    pool_texts = random_instructions(40, seed + 100)
    fast = NoveltyFilter(pool_texts)
    naive = [rouge_tokens(t) for t in pool_texts]
    decisions = {"kept": 0, "dropped": 0}
    for text in random_instructions(count, seed):
        tokens = rouge_tokens(text)
        best, score = naive_nearest(naive, tokens)
        index, fast_score = fast.nearest(tokens)
        assert fast_score == score, text  # the exact nearest score, not a bound
        assert index == -1 and score == 0 or rouge_tokens(fast.texts[index]) and score == fast_score
        _, stopped = fast.nearest(tokens, stop_above=THRESHOLD)
        assert (stopped > THRESHOLD) == (score > THRESHOLD), text  # the decision
        if score <= THRESHOLD:
            fast.add(text, tokens)
            naive.append(tokens)
            decisions["kept"] += 1
        else:
            decisions["dropped"] += 1
    assert decisions["kept"] > count / 25 and decisions["dropped"] > count / 3  # both sides of the threshold


def generate_command(url: str, output: Path, *extra: str, model: str = "scripted") -> list[str]:
    return [PYTHON, "-m", "instructune.cli", "data", "generate", "--seed_tasks", str(SHARED_SEEDS),
            "--endpoint", url, "--model", model, "--output", str(output), "--api_key_env", "NO_KEY_HERE", *extra]


SHARED_SEEDS = SHARED_DATA / "seed_tasks.jsonl"
needs_seeds = pytest.mark.skipif(not SHARED_SEEDS.exists(), reason=f"{SHARED_SEEDS} is absent")


def run_in_process(command: list[str], capsys) -> types.SimpleNamespace:
    """A generate_command run in this process (the launch itself is not under test): its exit code and output."""
    capsys.readouterr()
    code = main(command[3:])
    out, err = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)


@needs_seeds
def test_the_command_writes_the_kept_tasks_and_a_summary(tmp_path, capsys):
    server = TaskServer()
    output = tmp_path / "generated.json"
    done = run_in_process(generate_command(server.url, output, "--num_instructions", "12", "--concurrency", "2"),
                          capsys)
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads(output.read_text())
    summary = json.loads(output.with_suffix(".summary.json").read_text())
    assert len(records) == 12 and summary["kept"] == 12 and summary["requests"] == sum(server.asked.values())
    assert set(records[0]) == {"instruction", "input", "output", "most_similar_instruction", "similarity"}
    assert all(r["similarity"] <= THRESHOLD for r in records)
    assert summary["a task a text model cannot do"] == summary["requests"]  # one per reply
    assert "kept 12 of 12" in done.stdout
    # an endpoint that answers nothing: a one-line error naming it and why, and nothing written
    dead = run_in_process(generate_command("http://127.0.0.1:9/v1", tmp_path / "none.json", "--num_instructions", "2",
                                        "--retries", "0", "--max_requests", "2"), capsys)
    assert dead.returncode == 2 and not (tmp_path / "none.json").exists()
    assert "http://127.0.0.1:9/v1: every one of the 2 requests failed (2 ConnectionRefusedError" in dead.stderr
    # chat-completions endpoints too
    chat = run_in_process(generate_command(server.url, tmp_path / "chat.json", "--num_instructions", "4", "--api",
                                           "chat"), capsys)
    assert chat.returncode == 0 and len(json.loads((tmp_path / "chat.json").read_text())) == 4, chat.stderr[-2000:]


@needs_seeds
@pytest.mark.slow
def test_a_killed_run_resumes_without_asking_anything_twice(tmp_path, capsys):
    server = TaskServer(delay=0.2)
    whole, resumed = tmp_path / "whole.json", tmp_path / "resumed.json"
    flags = ["--num_instructions", "30", "--concurrency", "2"]
    assert run_in_process(generate_command(server.url, whole, *flags), capsys).returncode == 0
    first = dict(server.asked)
    server.asked.clear()
    process = subprocess.Popen(generate_command(server.url, resumed, *flags), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while sum(server.asked.values()) < 4 and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not resumed.exists()  # nothing written half-way
    cached = sum(1 for line in resumed.with_suffix(".cache.jsonl").read_text().splitlines() if line.endswith("}"))
    asked_before = sum(server.asked.values())
    assert 0 < cached < len(first)
    done = run_in_process(generate_command(server.url, resumed, *flags), capsys)
    assert done.returncode == 0, done.stderr[-2000:]
    # every reply received before the kill came from the cache: only the others were asked (again, for those the
    # kill caught in flight)
    assert sum(server.asked.values()) - asked_before == len(first) - cached
    assert set(server.asked) == set(first)
    assert json.loads(resumed.read_text()) == json.loads(whole.read_text())


@needs_seeds
@pytest.mark.slow
def test_it_runs_against_instructune_serve(smollm2, tmp_path, capsys):
    process, port = launch_server(smollm2, "--max_tokens_limit", "256")
    try:
        output = tmp_path / "smol.json"
        done = run_in_process(generate_command(f"http://127.0.0.1:{port}/v1", output, "--num_instructions", "3",
                                            "--max_requests", "2", "--max_tokens", "96", "--concurrency", "2",
                                            model=smollm2.name), capsys)
        assert done.returncode == 0, done.stderr[-2000:]
        summary = json.loads(output.with_suffix(".summary.json").read_text())
        assert summary["requests"] == 2 and summary["tokens_used"] > 0
        assert isinstance(json.loads(output.read_text()), list)
    finally:
        process.terminate()
        process.wait(timeout=30)
