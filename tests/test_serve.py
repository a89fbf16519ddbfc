"""`instructune serve` over real HTTP on 127.0.0.1, with the built-in SmolLM2: OpenAI's own client, raw SSE framing,
50 concurrent clients, every malformed request a 4xx while the server keeps serving, greedy answers equal to
`instructune generate`'s, logprobs equal to the model's, lm-eval's local-completions through it, and the chat page
in headless Chromium (a screenshot is kept in test-artifacts/)."""

import http.client
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import PYTHON, REPO, launch_server, run_command, write_mc_task

pytestmark = pytest.mark.slow
KEY = "test-key-123"
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def server(smollm2):
    process, port = launch_server(smollm2, "--api_key_env", "SERVE_TEST_KEY", "--max_request_bytes", "100000",
                                  "--max_tokens_limit", "64", "--max_batch_size", "16", SERVE_TEST_KEY=KEY)
    yield port
    process.terminate()
    process.wait(timeout=30)


def call(port: int, method: str, path: str, body: bytes | dict | None = None, key: str | None = KEY):
    """(status, headers, raw body) of one request."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    connection.request(method, path, body=json.dumps(body) if isinstance(body, dict) else body, headers=headers)
    response = connection.getresponse()
    result = response.status, dict(response.getheaders()), response.read()
    connection.close()
    return result


def chat_body(content: str, **extra) -> dict:
    return {"model": "smollm2-135m", "messages": [{"role": "user", "content": content}], **extra}


def client(port):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)


def test_openai_client_gets_completions_and_a_stream_equal_to_generate(server, smollm2):
    openai = client(server)
    assert [m.id for m in openai.models.list().data] == ["smollm2-135m"]
    question = "Name three primary colours."
    reply = openai.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": question}],
                                           temperature=0, max_tokens=16)
    text = reply.choices[0].message.content
    assert reply.object == "chat.completion" and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 16 and reply.usage.prompt_tokens > 0
    stream = openai.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": question}],
                                            temperature=0, max_tokens=16, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == text
    generated = run_command([PYTHON, "-m", "instructune.cli", "generate", "--model_name_or_path", str(smollm2),
                             "--instruction", question, "--max_new_tokens", "16"])
    assert generated.returncode == 0 and generated.stdout.strip() == text.strip() != "", generated.stderr[-2000:]

    # several turns: the tokenizer's chat template (as training renders conversations), with a system message
    turns = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a fruit."},
             {"role": "assistant", "content": "An apple."}, {"role": "user", "content": "Another one?"}]
    multi = openai.chat.completions.create(model="smollm2-135m", messages=turns, temperature=0, max_tokens=8)
    assert multi.choices[0].message.content and multi.usage.prompt_tokens > reply.usage.prompt_tokens

    completion = openai.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=4,
                                           temperature=0)
    assert completion.object == "text_completion" and "Paris" in completion.choices[0].text
    seeded = [openai.completions.create(model="smollm2-135m", prompt="Once upon a time", max_tokens=8, temperature=1,
                                        seed=3).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_sse_framing_is_openais(server):
    # greedy, and a prompt whose answer is long: cut at 6 tokens every time (a sampled "Hello!" could end first)
    body = chat_body("Write a long story about a dragon.", max_tokens=6, temperature=0, stream=True,
                     stream_options={"include_usage": True})
    status, headers, raw = call(server, "POST", "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    text = raw.decode()
    assert text.endswith("data: [DONE]\n\n") and text.count("data: [DONE]") == 1
    events = [json.loads(e[len("data: "):]) for e in text.split("\n\n")[:-2]]
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-2]["choices"][0]["delta"] == {}
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-2])


def test_stop_sequences_end_answers_in_both_apis(server):
    full = json.loads(call(server, "POST", "/v1/completions", {"model": "smollm2-135m", "prompt": "1, 2, 3, 4,",
                                                                "max_tokens": 12, "temperature": 0})[2])
    text = full["choices"][0]["text"]
    assert " 7" in text, text
    stopped = json.loads(call(server, "POST", "/v1/completions", {"model": "smollm2-135m", "prompt": "1, 2, 3, 4,",
                                                                   "max_tokens": 12, "temperature": 0, "stop": [" 7"]})[2])
    assert stopped["choices"][0] == {"index": 0, "text": text[: text.index(" 7")], "logprobs": None, "finish_reason": "stop"}
    raw = call(server, "POST", "/v1/completions", {"model": "smollm2-135m", "prompt": "1, 2, 3, 4,", "max_tokens": 12,
                                                    "temperature": 0, "stop": " 7", "stream": True})[2].decode()
    pieces = [json.loads(e[6:])["choices"][0]["text"] for e in raw.split("\n\n") if e.startswith("data: {")]
    assert "".join(pieces) == text[: text.index(" 7")]


def test_fifty_concurrent_requests_are_all_answered_as_if_alone(server):
    questions = [f"What is {i} plus {i}?" for i in range(50)]
    alone = {q: json.loads(call(server, "POST", "/v1/chat/completions", chat_body(q, max_tokens=6, temperature=0))[2])
             for q in questions[:3]}
    with ThreadPoolExecutor(50) as pool:
        replies = list(pool.map(lambda q: call(server, "POST", "/v1/chat/completions",
                                               chat_body(q, max_tokens=6, temperature=0)), questions))
    assert [status for status, _, _ in replies] == [200] * 50
    bodies = [json.loads(raw) for _, _, raw in replies]
    assert all(b["usage"]["completion_tokens"] <= 6 and b["choices"][0]["message"]["content"] for b in bodies)
    for q, body in zip(questions, bodies):  # batched with others, greedy answers are those given alone
        if q in alone:
            assert body["choices"][0]["message"] == alone[q]["choices"][0]["message"]


def test_malformed_requests_get_their_4xx_and_the_server_keeps_serving(server):
    long_prompt = "hello " * 9000  # > 8192 tokens, < 100 kB
    cases = [
        (b"{not json", KEY, 400, "not valid JSON"),
        ({"model": "smollm2-135m"}, KEY, 400, "messages: Field required"),
        (chat_body("hi", temperature=5), KEY, 400, "temperature"),
        ({"model": "smollm2-135m", "messages": [{"role": "wizard", "content": "hi"}]}, KEY, 400, "messages.0.role"),
        (chat_body("hi", model="gpt-4"), KEY, 404, "the model 'gpt-4' does not exist"),
        (chat_body(long_prompt), KEY, 400, "this model's context is 8192 tokens"),
        (chat_body("hi", max_tokens=1000), KEY, 400, "at most 64"),
        (chat_body("hi", n=2), KEY, 400, "only n=1"),
        (chat_body("x" * 200_000), KEY, 413, "at most 100000"),
        (chat_body("hi"), None, 401, "API key"),
        (chat_body("hi"), "wrong", 401, "API key"),
    ]
    for body, key, status, message in cases:
        got, _, raw = call(server, "POST", "/v1/chat/completions", body, key=key)
        error = json.loads(raw)["error"]
        assert got == status and message in error["message"] and error["type"], (message, got, raw[:300])
        assert call(server, "GET", "/v1/models")[0] == 200
    assert call(server, "GET", "/v1/models", key=None)[0] == 401
    assert call(server, "GET", "/")[0] == 200  # the page itself needs no key (it asks for one)
    assert json.loads(call(server, "POST", "/v1/chat/completions", chat_body("hi", max_tokens=2))[2])["choices"]


def test_echo_and_logprobs_are_the_models_own(server, smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    prompts = [tokenizer("The capital of France is")["input_ids"], tokenizer("Two plus two equals")["input_ids"]]
    status, _, raw = call(server, "POST", "/v1/completions", {"model": "smollm2-135m", "prompt": prompts,
                                                              "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1})
    assert status == 200, raw
    choices = sorted(json.loads(raw)["choices"], key=lambda c: c["index"])
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    for ids, choice in zip(prompts, choices):
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(ids) + 1 and logprobs["token_logprobs"][0] is None
        assert choice["text"].startswith(tokenizer.decode(ids))
        with torch.no_grad():
            expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        given = torch.tensor(logprobs["token_logprobs"][1:len(ids)])
        torch.testing.assert_close(given, expected[torch.arange(len(ids) - 1), torch.tensor(ids[1:])], rtol=0, atol=1e-4)
        assert max(logprobs["top_logprobs"][-1].values()) == pytest.approx(logprobs["token_logprobs"][-1], abs=1e-6)


def test_lm_eval_local_completions_through_the_server_equals_lm_eval_on_the_model(server, smollm2, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(write_mc_task(tmp_path, "serve_tiny_mc")), include_defaults=False)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    through_server = simple_evaluate(
        model="local-completions", tasks=["serve_tiny_mc"], task_manager=tasks,
        model_args=f"model=smollm2-135m,base_url=http://127.0.0.1:{server}/v1/completions,tokenizer={smollm2},"
                   "tokenizer_backend=huggingface,num_concurrent=4,max_retries=1")
    direct = simple_evaluate(model="hf", model_args=f"pretrained={smollm2},dtype=float32", device="cpu",
                             tasks=["serve_tiny_mc"], task_manager=tasks, batch_size=4)
    served, local = through_server["results"]["serve_tiny_mc"], direct["results"]["serve_tiny_mc"]
    assert served["acc,none"] == local["acc,none"] >= 0.5, (served, local)
    # the per-question choice log-likelihoods agree, not only the accuracy
    for a, b in zip(sorted(through_server["samples"]["serve_tiny_mc"], key=lambda s: s["doc_id"]),
                    sorted(direct["samples"]["serve_tiny_mc"], key=lambda s: s["doc_id"])):
        assert [r[0] for r in a["filtered_resps"]] == pytest.approx([r[0] for r in b["filtered_resps"]], abs=1e-3)


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="the page test needs Debian's chromium and chromium-driver (apt-get install; .ci/run does)")
def test_chat_page_streams_an_answer_in_a_real_browser(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,800"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        browser.get(f"http://127.0.0.1:{server}/")
        browser.find_element(By.ID, "api_key").send_keys(KEY)
        for field, value in (("max_tokens", "48"), ("temperature", "0")):  # greedy: the answer is known
            browser.find_element(By.ID, field).clear()
            browser.find_element(By.ID, field).send_keys(value)
        browser.find_element(By.ID, "instruction").send_keys("Give three tips for staying healthy.")
        browser.find_element(By.ID, "send").click()
        lengths, deadline = set(), time.time() + 120
        while time.time() < deadline:
            answers = browser.find_elements(By.CSS_SELECTOR, ".assistant")
            if answers:
                lengths.add(len(answers[-1].text))
                if answers[-1].get_attribute("data-done"):
                    break
            time.sleep(0.02)
        assert answers and answers[-1].get_attribute("data-done"), "no answer finished in 120 s"
        final = answers[-1].text
        assert final and "error" not in answers[-1].get_attribute("class")
        expected = json.loads(call(server, "POST", "/v1/chat/completions", chat_body(
            "Give three tips for staying healthy.", max_tokens=48, temperature=0, top_p=0.9))[2])
        assert final.strip() == expected["choices"][0]["message"]["content"].strip()  # the server's own answer
        assert len({n for n in lengths if 0 < n < len(final)}) >= 2, lengths  # it grew while streaming in
        assert browser.find_element(By.ID, "model").text == "smollm2-135m"
        browser.find_element(By.CSS_SELECTOR, "input[value=chat]").click()  # free chat: two turns, one history
        for done, message in enumerate(("Name a fruit.", "Another one?"), start=2):
            browser.find_element(By.ID, "instruction").send_keys(message)
            browser.find_element(By.ID, "send").click()
            deadline = time.time() + 120
            while time.time() < deadline and len(browser.find_elements(By.CSS_SELECTOR, ".assistant[data-done]")) < done:
                time.sleep(0.05)
        turns = browser.find_elements(By.CSS_SELECTOR, ".turn")
        assert [t.get_attribute("class").split()[1] for t in turns] == ["user", "assistant"] * 3
        assert all(t.text for t in turns)
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "chat_page.png"))
        assert (ARTIFACTS / "chat_page.png").stat().st_size > 10_000
    finally:
        browser.quit()
