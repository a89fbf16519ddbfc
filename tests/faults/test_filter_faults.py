"""The data filter never loses its input or a run (#20 §3): an output that is an input is refused, a run whose every
request failed writes nothing and exits non-zero, odd Retry-After values and replies cut short are retried, the
timeout is a deadline per request, a torn cache line costs only itself, and scores off the 0-5 scale are refused."""

import email.utils
import json
import logging
import time

import pytest

from instructune.cli import main
from instructune.data import load_conversations
from instructune.data.rater import parse_score, rate
from instructune.inference import client as client_module
from instructune.inference.client import ChatClient, retry_after_seconds

from scripted_judge import ScriptedJudge


@pytest.fixture
def judge():
    server = ScriptedJudge()
    yield server
    server.close()


def records(path, *instructions):
    path.write_text(json.dumps([{"instruction": text, "input": "", "output": "An answer."} for text in instructions]))
    return path


def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_an_output_that_is_an_input_is_refused(judge, tmp_path, capsys):
    """Seen: `data filter v.json --output v.json` against a failing judge overwrote v.json with [] and exited 0."""
    data = records(tmp_path / "v.json", "a [fail=500x9]")
    before = data.read_bytes()
    assert main(["data", "filter", str(data), "--output", str(data), "--judge_url", judge.url, "--judge_model", "j"]) == 2
    assert last_error(capsys) == f"error: {data}: is the input data's file; choose another --output"
    assert main(["data", "filter", str(tmp_path), "--output", str(tmp_path / "kept.json"), "--judge_url", judge.url,
                 "--judge_model", "j"]) == 2
    assert last_error(capsys) == f"error: {tmp_path / 'kept.json'}: lies inside the input data ({tmp_path}); choose another --output"
    assert data.read_bytes() == before and sum(judge.requests.values()) == 0


def test_a_run_whose_every_request_failed_writes_nothing(judge, tmp_path, capsys):
    data = records(tmp_path / "in.json", "a [fail=500x9]", "b [fail=503x9]")
    out = tmp_path / "kept.json"
    assert main(["data", "filter", str(data), "--output", str(out), "--judge_url", judge.url, "--judge_model", "j",
                 "--retries", "0"]) == 2
    assert last_error(capsys) == (f"error: {judge.url}: every one of the 2 rating requests failed (1 HTTP 500, 1 HTTP "
                                  f"503); nothing written to {out}")
    assert not list(tmp_path.glob("kept.*json"))


@pytest.mark.parametrize("flag, value", [("--concurrency", "0"), ("--retries", "-1"), ("--timeout", "0")])
def test_client_flags_out_of_range_are_one_line(tmp_path, capsys, flag, value):
    data = records(tmp_path / "in.json", "a")
    assert main(["data", "filter", str(data), "--output", str(tmp_path / "o.json"), "--judge_url", "http://127.0.0.1:9",
                 "--judge_model", "j", flag, value]) == 2
    assert last_error(capsys).startswith(f"error: {flag} {value}: must be between")


def test_retry_after_values_are_read_or_ignored():
    now = time.time()
    assert retry_after_seconds("2.5") == 2.5 and retry_after_seconds("0") == 0
    assert abs(retry_after_seconds(email.utils.formatdate(now + 30, usegmt=True), now) - 30) < 1.01
    assert retry_after_seconds(email.utils.formatdate(now - 30, usegmt=True), now) == 0  # a date in the past
    for unreadable in ("-5", "NaN", "inf", "soon", "", None, "Wed, 99 Foo 2026 00:00:00 GMT"):
        assert retry_after_seconds(unreadable) is None, unreadable


def test_odd_retry_after_and_replies_cut_short_are_retried(judge, tmp_path, monkeypatch, caplog):
    """Seen: an HTTP-date, negative or NaN Retry-After crashed the run; a reply cut short raised IncompleteRead out of
    it; Retry-After: 86400 was obeyed."""
    monkeypatch.setattr(client_module, "MAX_RETRY_AFTER", 0.2)
    date = email.utils.formatdate(time.time() + 0.1, usegmt=True)
    conversations = load_conversations(str(records(
        tmp_path / "in.json", f"a [fail=429x1] [retry_after={date}] [score=5]", "b [fail=429x1] [retry_after=-3] [score=4]",
        "c [fail=503x1] [retry_after=NaN] [score=3]", "d [fail=429x1] [retry_after=86400] [score=2]",
        "e [cut=2] [score=1]")))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="instructune"):
        verdicts = rate(conversations, ChatClient(judge.url, "j", retries=3, timeout=5, backoff=0.05))
    assert verdicts.scores == [5.0, 4.0, 3.0, 2.0, 1.0] and time.monotonic() - started < 5
    assert [judge.requests[c.messages[0].content] for c in conversations] == [2, 2, 2, 2, 3]
    assert "asked to wait 86400 s before retrying (Retry-After); waiting 0.2 s instead" in caplog.text


def test_the_timeout_is_a_deadline_per_request(judge, tmp_path):
    """Seen: --timeout bounded each socket read, so a reply trickled out byte by byte was waited on for ever."""
    conversations = load_conversations(str(records(tmp_path / "in.json", "a [trickle=6] [score=4]")))
    started = time.monotonic()
    verdicts = rate(conversations, ChatClient(judge.url, "j", retries=1, timeout=1.0, backoff=0.01))
    assert verdicts.scores == [4.0] and judge.requests["a [trickle=6] [score=4]"] == 2
    assert time.monotonic() - started < 3  # the first attempt gave up at its 1 s deadline, not after 6 s


def test_a_torn_cache_line_costs_only_itself(judge, tmp_path):
    """Seen: the reply appended after a line torn by a kill joined that line and was lost (paid for again)."""
    conversations = load_conversations(str(records(tmp_path / "in.json", "a [score=5]", "b [score=4]", "c [score=3]")))
    cache = tmp_path / "cache.jsonl"
    client = ChatClient(judge.url, "j", cache=cache, concurrency=1)
    rate(conversations[:1], client)
    cache.write_text(cache.read_text() + '{"key": "torn-by-a-ki')  # a kill in the middle of the next line
    assert rate(conversations, client).scores == [5.0, 4.0, 3.0]
    assert len(client.load_cache()) == 3  # b and c were kept, not lost with the torn line
    asked = sum(judge.requests.values())
    assert rate(conversations, client).scores == [5.0, 4.0, 3.0] and sum(judge.requests.values()) == asked


@pytest.mark.parametrize("reply", ["4.5/10", "-3", "Score: -3", "score: 4 out of 10", "**4**/10\nok"])
def test_scores_off_the_scale_are_refused(reply):
    """Seen: '4.5/10' was read as 4.5 and '-3' as 3."""
    assert parse_score(reply) is None
