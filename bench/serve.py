"""Requests per second and time to first token of `instructune serve` at 1, 8 and 32 concurrent clients, as ratios
against a one-request-at-a-time loop (the same engine, no server, no batching), same model, prompts and lengths.

The server runs as `instructune serve` in its own process; each client sends streamed chat requests (greedy, at most
--max_tokens new tokens; the same prompts in every setting, so the same tokens are generated) and measures the time to
the first content chunk. Time to first token under load includes the wait in the queue.

    .venv/bin/python bench/serve.py                 # SmolLM2-135M (built in), ~3 minutes on 2 CPU cores
    .venv/bin/python bench/serve.py --model <folder> --requests 64 --max_tokens 64

Last line, machine-readable: rps_ratio_<c> and ttft_ratio_<c> for each concurrency c.
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "vicuna_test_set.jsonl"


def questions(count: int) -> list[str]:
    if SHARED.is_file():
        texts = [json.loads(line)["text"] for line in SHARED.read_text().splitlines() if line.strip()]
    else:
        print(f"({SHARED} is absent: using the sample data's instructions)")
        texts = [r["instruction"] for r in json.loads((REPO / "alpaca_data.json").read_text())]
    return [texts[i % len(texts)] for i in range(count)]


def reference(model: str, prompts: list[str], max_tokens: int) -> tuple[float, float]:
    """(requests/s, mean time to first token) of a loop over the engine, one request at a time."""
    sys.path.insert(0, str(REPO))
    from instructune.data.formats import Message
    from instructune.inference.engine import Request, Sampling, load

    engine = load(model)
    first_tokens, start = [], time.perf_counter()
    for prompt in prompts:
        began, first = time.perf_counter(), []
        request = Request(engine.prompt_ids([Message("user", prompt)]), Sampling(max_tokens, seed=0),
                          on_text=lambda piece: first or first.append(time.perf_counter()))
        engine.generate([request])
        first_tokens.append(first[0] - began)
    return len(prompts) / (time.perf_counter() - start), statistics.mean(first_tokens)


def one_request(port: int, name: str, prompt: str, max_tokens: int) -> tuple[float, float]:
    """(time to first content, total time) of one streamed chat request."""
    began = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/v1/chat/completions", body=json.dumps({
        "model": name, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
        "stream": True}), headers={"Content-Type": "application/json"})
    response, first = connection.getresponse(), None
    assert response.status == 200, response.read()
    for line in response:
        if first is None and line.startswith(b"data: {") and b'"content": "' in line and b'"content": ""' not in line:
            first = time.perf_counter() - began
    connection.close()
    return first or time.perf_counter() - began, time.perf_counter() - began


def measure(port: int, name: str, prompts: list[str], max_tokens: int, clients: int) -> tuple[float, float]:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: one_request(port, name, p, max_tokens), prompts))
    return len(prompts) / (time.perf_counter() - start), statistics.mean(r[0] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=32, help="requests per setting")
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--concurrency", default="1,8,32")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = questions(args.requests)

    ref_rps, ref_ttft = reference(args.model, prompts, args.max_tokens)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "instructune.cli", "serve", "--model", args.model, "--port",
                               str(port), "--max_batch_size", str(max(levels))], cwd=REPO, env=os.environ)
    try:
        name = None
        for _ in range(600):
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/v1/models")
                name = json.loads(connection.getresponse().read())["data"][0]["id"]
                break
            except OSError:
                time.sleep(0.5)
        one_request(port, name, prompts[0], 4)  # warm-up
        figures = {c: measure(port, name, prompts, args.max_tokens, c) for c in levels}
    finally:
        server.terminate()
        server.wait()

    print(f"\n{name}: {args.requests} chat requests of {args.max_tokens} new tokens each, greedy, streamed")
    print(f"  reference, one at a time, no server: {ref_rps:6.2f} requests/s   time to first token {ref_ttft * 1000:7.0f} ms")
    ratios = {}
    for c, (rps, ttft) in figures.items():
        ratios[f"rps_ratio_{c}"], ratios[f"ttft_ratio_{c}"] = rps / ref_rps, ttft / ref_ttft
        print(f"  server, {c:2d} concurrent clients:      {rps:6.2f} requests/s ({rps / ref_rps:4.2f}×)   "
              f"time to first token {ttft * 1000:7.0f} ms ({ttft / ref_ttft:5.2f}×)")
    print(" ".join(f"{k}={v:.3f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
