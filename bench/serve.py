"""Serving under load: requests/s, tokens/s and time to first token (p50, p95) at 1, 8 and 32 concurrent clients, for
four ways of scheduling the same model, prompts and lengths, measured in the same run:

- one at a time: `instructune serve --batching static --max_batch_size 1`;
- static batches: `instructune serve --batching static` (a request that arrives while a batch runs waits for it);
- continuous batching: `instructune serve` (a request joins the running rows after its prefill);
- transformers' ContinuousBatchingManager (`model.init_continuous_batching()`, paged cache), in this process.

Arrivals are staggered: each client waits an exponential time (mean --think_s) before each of its requests (closed
loop, the same seeds in every setting), and sends at least 3 (--requests in all, at least 3 per client). Requests are
streamed greedy chat completions of up to 8 to 56 new tokens (--max_tokens 32 on average, drawn per request with
the client's seed); time to first token is measured to the first content
chunk, includes any wait in a queue, and leaves out each client's first request: all the clients start within the
first second, a burst whose prefills alone take 32 × ~50 ms here, that no scheduling can hide.

    .venv/bin/python bench/serve.py                        # SmolLM2-135M (built in), ~8 minutes on 2 CPU cores
    .venv/bin/python bench/serve.py --requests 16 --concurrency 1,8   # quicker

Last line, machine-readable: ttft_p50_ratio_32=… (continuous batching's TTFT p50 at 32 clients ÷ its own at 1 client)
throughput_vs_static_32=… (its requests/s at 32 clients ÷ static batches')
"""

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "vicuna_test_set.jsonl"
sys.path.insert(0, str(REPO))

PER_CLIENT = 3  # requests per client at least: time to first token is measured on all but the first
SERVERS = {"one at a time": ["--batching", "static", "--max_batch_size", "1"],
           "static batches": ["--batching", "static"],
           "continuous": ["--batching", "continuous"]}


def questions(count: int) -> list[str]:
    if SHARED.is_file():
        texts = [json.loads(line)["text"] for line in SHARED.read_text().splitlines() if line.strip()]
    else:
        print(f"({SHARED} is absent: using the sample data's instructions)")
        texts = [r["instruction"] for r in json.loads((REPO / "alpaca_data.json").read_text())]
    return [texts[i % len(texts)] for i in range(count)]


def http_request(port: int, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(time to first content, completion tokens) of one streamed chat request."""
    began = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/v1/chat/completions", body=json.dumps({
        "model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}),
        headers={"Content-Type": "application/json"})
    response, first, tokens = connection.getresponse(), None, 0
    assert response.status == 200, response.read()
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter() - began
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    connection.close()
    return first if first is not None else time.perf_counter() - began, tokens


def load_test(send, prompts: list[str], clients: int, think_s: float, max_tokens: int) -> dict:
    """Closed-loop clients with exponential waits, each sending its share of the prompts (at least PER_CLIENT);
    requests/s and tokens/s of all the requests, TTFT p50/p95 of all but each client's first (the clients all start
    within the first second: that burst is the bench's start, not a load)."""
    results, lock = [], threading.Lock()
    prompts = [prompts[i % len(prompts)] for i in range(max(len(prompts), PER_CLIENT * clients))]
    shares = [prompts[i::clients] for i in range(clients)]

    def client(index: int) -> None:
        draws = random.Random(index)
        for number, prompt in enumerate(shares[index]):
            time.sleep(draws.expovariate(1 / think_s))
            # answers of different lengths (a quarter to 1.75 times the mean): with one length for all, the clients
            # would fall into step, start together and arrive in bursts
            ttft, tokens = send(prompt, draws.randint(max(1, max_tokens // 4), max_tokens * 7 // 4))
            with lock:
                results.append((ttft if number else None, tokens))

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    ttfts = sorted(r[0] for r in results if r[0] is not None)
    return {"rps": len(results) / elapsed, "tps": sum(r[1] for r in results) / elapsed,
            "ttft_p50": statistics.median(ttfts), "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * len(ttfts)))]}


def serve(model: str, options: list[str], max_batch_size: int):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "instructune.cli", "serve", "--model", model, "--port", str(port),
                               "--served_model_name", "bench", "--max_batch_size", str(max_batch_size), *options],
                              cwd=REPO, env=os.environ, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/v1/models")
            connection.getresponse().read()
            return server, port
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the server did not start")


def transformers_manager(model_name: str):
    """A send(prompt, max_tokens) through transformers' ContinuousBatchingManager on the same model, and a way to stop it."""
    from transformers import GenerationConfig

    from instructune.data.formats import Message
    from instructune.inference.engine import load

    engine = load(model_name)
    config = GenerationConfig(do_sample=False, eos_token_id=sorted(engine.eos_ids))
    manager = engine.model.init_continuous_batching(generation_config=config)
    manager.start()

    def send(prompt: str, max_tokens: int) -> tuple[float, int]:
        began, first = time.perf_counter(), None
        request_id = manager.add_request(engine.prompt_ids([Message("user", prompt)]), max_new_tokens=max_tokens,
                                         streaming=True)
        tokens = 0
        for output in manager.request_id_iter(request_id):
            tokens = len(output.generated_tokens)
            if first is None and tokens:
                first = time.perf_counter() - began
            if output.is_finished():
                break
        return first if first is not None else time.perf_counter() - began, tokens

    return send, manager.stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=32, help="requests per setting")
    parser.add_argument("--max_tokens", type=int, default=32, help="mean new tokens per request")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--think_s", type=float, default=0.25, help="mean wait of a client before each request")
    parser.add_argument("--skip_transformers", action="store_true", help="leave out transformers' manager")
    parser.add_argument("--skip_one_at_a_time", action="store_true", help="leave out the one-request-at-a-time server")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = questions(args.requests)
    figures: dict[str, dict[int, dict]] = {}
    for mode, options in SERVERS.items():
        if mode == "one at a time" and args.skip_one_at_a_time:
            continue
        server, port = serve(args.model, options, max(levels))
        try:
            http_request(port, prompts[0], 4)  # warm-up
            figures[mode] = {c: load_test(partial(http_request, port), prompts, c, args.think_s, args.max_tokens)
                             for c in levels}
        finally:
            server.terminate()
            server.wait()
        print(f"{mode}: " + "; ".join(f"{c} clients {f['rps']:.2f} req/s" for c, f in figures[mode].items()), flush=True)
    if not args.skip_transformers:
        try:
            send, stop = transformers_manager(args.model)
            try:
                send(prompts[0], 4)  # warm-up
                figures["transformers' manager"] = {c: load_test(send, prompts, c, args.think_s, args.max_tokens)
                                                    for c in levels}
            finally:
                stop()
        except Exception as e:  # its API moves between releases: say so, keep the other figures
            print(f"transformers' ContinuousBatchingManager failed: {type(e).__name__}: {e}"[:300])

    print(f"\n{args.model}: streamed greedy chat requests of {args.max_tokens // 4} to {args.max_tokens * 7 // 4} new tokens, max(--requests "
          f"{args.requests}, {PER_CLIENT} per client) per setting, clients waiting exponential times (mean "
          f"{args.think_s} s) before each request; TTFT of all but each client's first request")
    print(f"{'':22s} {'clients':>7s} {'req/s':>7s} {'tokens/s':>9s} {'TTFT p50':>9s} {'TTFT p95':>9s}")
    for mode, by_level in figures.items():
        for c, f in by_level.items():
            print(f"{mode:22s} {c:7d} {f['rps']:7.2f} {f['tps']:9.1f} {f['ttft_p50'] * 1000:7.0f}ms "
                  f"{f['ttft_p95'] * 1000:7.0f}ms")
    ours, top = figures["continuous"], max(levels)
    print(f"ttft_p50_ratio_{top}={ours[top]['ttft_p50'] / ours[min(levels)]['ttft_p50']:.2f} "
          f"throughput_vs_static_{top}={ours[top]['rps'] / figures['static batches'][top]['rps']:.2f}")


if __name__ == "__main__":
    main()
