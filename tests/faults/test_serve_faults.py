"""One request's failure is that request's alone (#20 §2): values that used to raise inside the model thread (and
fail every request batched with them) are 400s; a batch that fails anyway fails only its failing row, and a stream so
failed ends with an error event and [DONE]; bodies are counted while read; stop lists are bounded; a non-streamed
request whose client leaves frees its row; web pages cannot reach the server (JSON bodies only, loopback Host names);
404/405 come in OpenAI's shape; SIGTERM drains and exits 0. A tiny model served in-process on 127.0.0.1, except for
the signal test (the real command, with the built-in SmolLM2)."""

import http.client
import json
import select
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import uvicorn

from instructune.inference.engine import load
from instructune.serve.app import Limits, create_app

from conftest import free_port, launch_server

pytestmark = pytest.mark.slow  # a model loaded or built per test: the full suite's tier

POISON = 42  # a prompt holding this token id fails inside the model (the test's stand-in for a row that breaks)


class Spy:
    """On the model: slows each forward a little (so that requests can be caught in flight), counts the forwards, and
    fails any forward whose input holds a poisoned token."""

    def __init__(self, model):
        self.forwards = 0
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        time.sleep(0.003)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and bool((ids == POISON).any()):
            raise RuntimeError("a poisoned row")
        self.forwards += 1

    def settled(self, quiet_s: float = 0.5, timeout_s: float = 30) -> int:
        """The forward count once no forward has run for `quiet_s` (the server idle)."""
        deadline, seen = time.time() + timeout_s, -1
        while seen != self.forwards and time.time() < deadline:
            seen = self.forwards
            time.sleep(quiet_s)
        return self.forwards


def serve(tiny_llama, batching: str):
    engine = load(str(tiny_llama))
    engine.name = "tiny"
    spy = Spy(engine.model)
    port = free_port()
    limits = Limits(max_batch_size=8, max_tokens=400, max_request_bytes=100_000, batch_wait_ms=300, batching=batching)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, limits), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield port, spy
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def served(tiny_llama):
    yield from serve(tiny_llama, "continuous")


@pytest.fixture(scope="module", params=["continuous", "static"])
def served_each(tiny_llama, request):
    """The server with each way of batching."""
    yield from serve(tiny_llama, request.param)


def call(port, method, path, body=None, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    sent = {"Content-Type": "application/json", **(headers or {})}
    connection.request(method, path, body=json.dumps(body) if isinstance(body, (dict, list)) else body, headers=sent)
    response = connection.getresponse()
    status, raw = response.status, response.read()
    connection.close()
    return status, raw


def completion(prompt, **extra):
    return {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0} | extra


def events_of(raw: bytes) -> list:
    return [line.removeprefix("data: ") for line in raw.decode().split("\n\n") if line.startswith("data: ")]


@pytest.mark.parametrize("extra, param", [
    ({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed"), ({"temperature": 1e-320}, "temperature"),
    ({"prompt": [1, 5, -1]}, "prompt"), ({"prompt": [1, 5, 600]}, "prompt"), ({"prompt": [[1, 5], [1, 10**9]]}, "prompt"),
    ({"stop": [str(i) for i in range(5)]}, "stop"), ({"stop": "x" * 257}, "stop"),
])
def test_values_that_would_fail_inside_the_model_are_400s(served, extra, param):
    """Seen: these passed validation and raised in the model thread, failing every request batched with them."""
    port, _ = served
    status, raw = call(port, "POST", "/v1/completions", completion([1, 5, 6]) | extra)
    error = json.loads(raw)["error"]
    assert status == 400 and error["type"] == "invalid_request_error", raw
    assert error["param"] == param or error["param"].startswith(param), error
    assert call(port, "POST", "/v1/completions", completion([1, 5, 6]))[0] == 200  # and the server keeps serving


def test_a_vanishing_top_p_samples_the_likeliest_token(served):
    """Seen: top_p 1e-300 rounded to 0 in float32, dropped every token and failed the batch; it means greedy."""
    port, _ = served
    greedy = json.loads(call(port, "POST", "/v1/completions", completion([1, 5, 6]))[1])["choices"][0]["text"]
    status, raw = call(port, "POST", "/v1/completions", completion([1, 5, 6], temperature=1.0, top_p=1e-300, seed=3))
    assert status == 200 and json.loads(raw)["choices"][0]["text"] == greedy


def test_a_failing_row_fails_alone_and_its_stream_ends_with_an_error_and_done(served_each):
    """Seen: one bad row gave every request batched with it a 500, and a co-batched stream ended after its role chunk
    with no error and no [DONE]. (Static batches generate a failed batch's rows again one at a time; continuous
    batching prefills a failed group's requests again one at a time.)"""
    port, _ = served_each
    chat = {"model": "tiny", "max_tokens": 8, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Say hi."}]}
    requests = [("/v1/completions", completion([1, 5, 6])), ("/v1/completions", completion([1, POISON, 6])),
                ("/v1/completions", completion([1, POISON], stream=True)), ("/v1/chat/completions", chat),
                ("/v1/completions", completion([1, 100, 200, 300], temperature=1.0, seed=7))]
    alone = [call(port, "POST", *request) for request in requests]
    with ThreadPoolExecutor(len(requests)) as pool:  # all within one batch_wait_ms: one batch
        together = list(pool.map(lambda request: call(port, "POST", *request), requests))
    assert [status for status, _ in together] == [200, 500, 200, 200, 200]

    def answer(raw: bytes) -> str:
        return json.loads(raw)["choices"][0]["text"]

    def streamed(raw: bytes) -> str:
        return "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events_of(raw)[:-1])

    assert answer(together[0][1]) == answer(alone[0][1]) and answer(together[4][1]) == answer(alone[4][1])
    assert streamed(together[3][1]) == streamed(alone[3][1]) and events_of(together[3][1])[-1] == "[DONE]"
    assert json.loads(together[1][1])["error"]["message"] == "generation failed: a poisoned row"
    poisoned = events_of(together[2][1])
    assert json.loads(poisoned[-2])["error"]["message"] == "generation failed: a poisoned row"
    assert poisoned[-1] == "[DONE]"


def read_reply(client: socket.socket) -> bytes:
    """The whole reply: its headers and body can come in separate packets."""
    reply = b""
    while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < content_length(reply):
        try:
            data = client.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        reply += data
    return reply


def content_length(reply: bytes) -> int:
    for line in reply.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_a_chunked_body_is_cut_off_at_the_limit(served):
    """Seen: a chunked body (no Content-Length) was read whole (300 MB, RSS +535 MB) before the limit applied."""
    port, _ = served
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n")
        chunk, sent = b"x" * 65536, 0
        while sent < 50_000_000:
            try:
                client.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
            if select.select([client], [], [], 0)[0]:
                break
        reply = read_reply(client)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert sent < 5_000_000  # refused after about the limit (100 KB), not after the whole body
    assert b"at most 100000 bytes" in reply


def test_a_non_streamed_request_whose_client_leaves_frees_its_row(served_each):
    """Seen: it generated to its full budget after the client had gone."""
    port, spy = served_each
    body = json.dumps(completion([1, 100, 200, 300], max_tokens=300)).encode()
    status, raw = call(port, "POST", "/v1/completions", body)
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 300  # left alone, it runs to its budget
    before = spy.settled()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.4)  # generating by now
    assert 0 < spy.settled() - before < 300


def test_web_pages_cannot_reach_the_server(served):
    """Seen: without an API key any web page could use it, by DNS rebinding (no Host check) or with a text/plain body
    (which needs no CORS preflight)."""
    port, _ = served
    status, raw = call(port, "POST", "/v1/completions", json.dumps(completion([1, 5])), {"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in json.loads(raw)["error"]["message"]
    for path in ("/", "/v1/models"):
        status, raw = call(port, "GET", path, headers={"Host": f"rebound.example.com:{port}"})
        assert status == 403 and json.loads(raw)["error"]["code"] == "host_not_allowed"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert call(port, "GET", "/v1/models", headers={"Host": host})[0] == 200


def test_404_and_405_come_in_openais_shape(served):
    port, _ = served
    status, raw = call(port, "GET", "/v1/nothing-here")
    assert status == 404 and json.loads(raw)["error"]["message"] == "Not Found"
    status, raw = call(port, "GET", "/v1/completions")
    assert status == 405 and json.loads(raw)["error"]["message"] == "Method Not Allowed"


@pytest.mark.slow
def test_sigterm_finishes_what_is_in_hand_then_exits_0(smollm2):
    """Seen: SIGTERM ended the server with what was in hand cut off. Now: no new connections, the running request
    finishes (its stream ends with [DONE]) and the process exits 0; past the grace time, what is left is cancelled."""
    for grace, max_tokens, finishes in ((30, 24, True), (1, 400, False)):
        process, port = launch_server(smollm2, "--shutdown_grace_s", str(grace), "--max_tokens_limit", "512")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            connection.request("POST", "/v1/chat/completions", json.dumps({
                "model": "smollm2-135m", "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "messages": [{"role": "user", "content": "Write a long story about a cat."}]}),
                {"Content-Type": "application/json"})
            response = connection.getresponse()
            assert response.readline().startswith(b"data: ")  # the role chunk: the request is in hand
            sent_at = time.time()
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(OSError):  # no longer accepting
                call(port, "GET", "/v1/models")
            try:
                rest = response.read()
            except http.client.IncompleteRead as e:  # cancelled at the grace time
                rest = e.partial
            assert process.wait(timeout=grace + 30) == 0, process.stdout.read()
            assert time.time() - sent_at < grace + 15
            assert rest.rstrip().endswith(b"data: [DONE]") == finishes, rest[-300:]
        finally:
            process.kill()
            process.wait()
