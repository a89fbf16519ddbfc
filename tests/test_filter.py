"""`instructune data filter` against a real local chat-completions server: records kept by score, retries on
429/5xx/timeouts, a concurrency limit, unparseable replies counted as failures (never scores), and resume
after a kill without paying twice."""

import json
import os
import signal
import subprocess
import time

import pytest

from instructune.cli import main
from instructune.data import load_conversations
from instructune.data.rater import parse_score, rate
from instructune.inference.client import ChatClient

from conftest import PYTHON, REPO
from scripted_judge import ScriptedJudge


@pytest.fixture
def judge():
    server = ScriptedJudge(api_key="test-key")
    yield server
    server.close()


def records(path, *instructions):
    path.write_text(json.dumps([{"instruction": text, "input": "", "output": "An answer."} for text in instructions]))
    return path


@pytest.mark.parametrize("reply, expected", [
    ("4.5\nAccurate and helpful.", (4.5, "Accurate and helpful.")), ("Score: 4", (4.0, "")), ("**5**/5\nGreat", (5.0, "Great")),
    ("3 out of 5\nok", (3.0, "ok")), ("The answer is fine. Score: 3.5", (3.5, "The answer is fine. Score: 3.5")),
    ("I cannot rate this.", None), ("7\ntoo high", None), ("", None),
])
def test_scores_are_parsed_robustly_and_never_guessed(reply, expected):
    assert parse_score(reply) == expected


def test_filter_keeps_records_at_or_above_the_threshold(judge, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JUDGE_KEY", "test-key")
    data = records(tmp_path / "in.json", "a [score=5]", "b [score=4.5]", "c [score=4]", "d [score=2]",
                   "e [say=Score: 4.5]", "f [say=I refuse to rate.]", "g [say=4/5\\nfine]")
    out = tmp_path / "kept.json"
    assert main(["data", "filter", str(data), "--output", str(out), "--judge_url", judge.url, "--judge_model", "j",
                 "--threshold", "4.5", "--api_key_env", "JUDGE_KEY"]) == 0
    assert [r["instruction"] for r in json.loads(out.read_text())] == ["a [score=5]", "b [score=4.5]", "e [say=Score: 4.5]"]
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert (summary["kept"], summary["dropped"], summary["failed"]) == (3, 3, 1)
    assert summary["failures"] == {"no parseable score in the reply": 1}
    assert summary["score_histogram"] == {"2": 1, "4": 2, "4.5": 2, "5": 1}
    assert out.with_suffix(".scores.png").read_bytes()[:4] == b"\x89PNG"
    assert "kept 3 of 7 records" in capsys.readouterr().out
    # failures are not cached: the same command asks again for the one failure only
    before = sum(judge.requests.values())
    assert main(["data", "filter", str(data), "--output", str(out), "--judge_url", judge.url, "--judge_model", "j",
                 "--api_key_env", "JUDGE_KEY"]) == 0
    assert sum(judge.requests.values()) - before == 1 and judge.requests["f [say=I refuse to rate.]"] == 2


def test_retries_on_429_5xx_and_timeouts(judge, tmp_path):
    conversations = load_conversations(str(records(tmp_path / "in.json", "a [fail=429x2] [score=5]",
                                                   "b [fail=503x1] [score=4]", "c [slow=3] [score=3]",
                                                   "d [fail=429x9] [score=5]", "e [fail=400x1] [score=5]")))
    client = ChatClient(judge.url, "j", "test-key", retries=3, timeout=1.0, backoff=0.05)
    verdicts = rate(conversations, client)
    assert verdicts.scores == [5.0, 4.0, 3.0, None, None]
    assert [judge.requests[c.messages[0].content] for c in conversations] == [3, 2, 2, 4, 1]  # 400: not retried
    assert verdicts.failures == {"HTTP 429": 1, "HTTP 400": 1}


def test_concurrency_is_limited(tmp_path):
    server = ScriptedJudge(delay=0.2)
    try:
        conversations = load_conversations(str(records(tmp_path / "in.json", *[f"r{i} [score=4]" for i in range(12)])))
        rate(conversations, ChatClient(server.url, "j", concurrency=3))
        assert server.most_in_flight == 3 and sum(server.requests.values()) == 12
    finally:
        server.close()


@pytest.mark.slow
def test_a_killed_filter_resumes_without_paying_twice(tmp_path):
    server = ScriptedJudge(delay=0.1)
    try:
        data = records(tmp_path / "in.json", *[f"r{i} [score={i % 6}]" for i in range(40)])
        out, cache = tmp_path / "kept.json", tmp_path / "kept.cache.jsonl"
        command = [PYTHON, "-m", "instructune.cli", "data", "filter", str(data), "--output", str(out),
                   "--judge_url", server.url, "--judge_model", "j", "--threshold", "3", "--concurrency", "2"]
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 120
        while (not cache.exists() or len(cache.read_text().splitlines()) < 10) and time.time() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        paid = len(cache.read_text().splitlines())
        assert 10 <= paid < 40 and not out.exists()  # the output appears only when complete
        asked = sum(server.requests.values())
        assert main(["data", "filter", str(data), "--output", str(out), "--judge_url", server.url,
                     "--judge_model", "j", "--threshold", "3"]) == 0
        assert sum(server.requests.values()) - asked == 40 - paid
        assert len(json.loads(out.read_text())) == sum(i % 6 >= 3 for i in range(40))
    finally:
        server.close()
