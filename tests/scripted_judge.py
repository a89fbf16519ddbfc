"""A real HTTP server on 127.0.0.1 that speaks the chat-completions protocol and answers as the record under
rating scripts it, with markers in the record's text:
    [score=4.5]      reply "4.5" and a reason          [say=TEXT]   reply TEXT verbatim (parsing tests)
    [fail=429x2]     the first 2 requests get HTTP 429  [slow=2]     the first request waits 2 s
    [retry_after=V]  a failure's Retry-After header     [cut=1]      the first reply is cut short (connection closed)
    [trickle=2]      the first reply's bytes trickle out over 2 s
and, asked to compare two answers (the pairwise judge's prompt), scores each answer by its [q=N] marker, or favours
the first position for a question marked [bias=first]. It counts requests per record and the most requests in flight at once."""

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ScriptedJudge:
    def __init__(self, delay: float = 0.0, api_key: str | None = None):
        self.delay, self.api_key = delay, api_key
        self.requests: Counter = Counter()
        self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                judge.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        body = json.loads(request.rfile.read(int(request.headers["Content-Length"])))
        text = body["messages"][-1]["content"]
        found = re.search(r"### Instruction:\n(.*)|\[Question\]\n(.*)", text)
        record = found.group(1) or found.group(2)
        with self.lock:
            self.requests[record] += 1
            count = self.requests[record]
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            status, payload, retry_after = self.answer(request, body, record, count)
        finally:  # counted until the reply is ready: once it is sent, the client may already send the next one
            with self.lock:
                self.in_flight -= 1
        cut = (m := re.search(r"\[cut=(\d+)\]", record)) and count <= int(m.group(1))
        trickle = float(m.group(1)) if (m := re.search(r"\[trickle=([\d.]+)\]", record)) and count == 1 else 0
        self.send(request, status, payload, retry_after, cut=cut, trickle=trickle)

    def answer(self, request, body: dict, record: str, count: int) -> tuple[int, dict, str | None]:
        time.sleep(self.delay)
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return 401, {"error": {"message": "bad key"}}, None
        if (fail := re.search(r"\[fail=(\d+)x(\d+)\]", record)) and count <= int(fail.group(2)):
            after = re.search(r"\[retry_after=(.*?)\]", record)
            return int(fail.group(1)), {"error": {"message": "scripted"}}, after.group(1) if after else "0.05"
        if (slow := re.search(r"\[slow=([\d.]+)\]", record)) and count == 1:
            time.sleep(float(slow.group(1)))
        said = re.search(r"\[say=(.*?)\]", record)
        score = re.search(r"\[score=([\d.]+)\]", record)
        if said:
            reply = said.group(1).replace("\\n", "\n")
        elif "[The Start of Assistant 1's Answer]" in body["messages"][-1]["content"]:
            reply = self.pairwise(record, body["messages"][-1]["content"])
        else:
            reply = f"{score.group(1)}\nScripted reason."
        return 200, {"id": "x", "object": "chat.completion", "model": body["model"],
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                  "finish_reason": "stop"}]}, None

    @staticmethod
    def pairwise(question: str, text: str) -> str:
        """Scores "s1 s2" for two answers: each answer's [q=N] (5 without one), or 9 and 3 whatever the answers for a
        question marked [bias=first] (a judge that favours the first position)."""
        if "[bias=first]" in question:
            return "9 3\nThe first answer is better."
        answers = re.findall(r"Assistant \d's Answer\]\n(.*?)\n\n\[The End", text, re.S)
        scores = [m.group(1) if (m := re.search(r"\[q=(\d+)\]", a)) else "5" for a in answers]
        return f"{scores[0]} {scores[1]}\nScripted pairwise reason."

    @staticmethod
    def send(request, status: int, payload: dict, retry_after: str | None = None, cut: bool = False,
             trickle: float = 0) -> None:
        data = json.dumps(payload).encode()
        try:
            request.send_response(status)
            request.send_header("Content-Type", "application/json")
            request.send_header("Content-Length", str(len(data)))
            if retry_after:
                request.send_header("Retry-After", retry_after)
            request.end_headers()
            if cut:  # half the body, then the connection closes
                request.wfile.write(data[: len(data) // 2])
                request.close_connection = True
                return
            for i in range(len(data)) if trickle else ():
                request.wfile.write(data[i:i + 1])
                request.wfile.flush()
                time.sleep(trickle / len(data))
            if not trickle:
                request.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout being tested)
            pass

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
