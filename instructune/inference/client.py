"""A small client for OpenAI-compatible chat-completions endpoints, for many requests at once: a concurrency
limit, retries with exponential backoff on 429, 5xx, timeouts and dropped connections (Retry-After
honoured), and a resumable on-disk cache so an interrupted run continues without paying twice.
Used by the data filter (and meant for the evaluation judge and the server's tests).

Only the standard library: a thread pool of urllib requests is plenty for a rate-limited remote API.
"""

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

RETRIED_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclass
class Failure:
    reason: str


@dataclass
class ChatClient:
    url: str  # the API base (http://host:port/v1) or the full .../chat/completions address
    model: str
    api_key: str | None = None
    concurrency: int = 8
    retries: int = 5
    timeout: float = 60.0
    backoff: float = 1.0  # seconds before the first retry; doubled each time
    cache: Path | None = None  # a JSON Lines file of {key, reply}, appended as replies arrive
    params: dict = field(default_factory=lambda: {"temperature": 0.0, "max_tokens": 256})

    def __post_init__(self):
        base = self.url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self._lock = threading.Lock()

    def key(self, messages: list[dict]) -> str:
        text = json.dumps({"model": self.model, "messages": messages, "params": self.params}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def load_cache(self) -> dict[str, str]:
        """Replies already paid for; a line torn by a kill is ignored."""
        replies = {}
        if self.cache and self.cache.exists():
            for line in self.cache.read_text(encoding="utf-8").split("\n"):
                try:
                    entry = json.loads(line)
                    replies[entry["key"]] = entry["reply"]
                except (ValueError, KeyError, TypeError):
                    continue
        return replies

    def complete_all(self, conversations: list[list[dict]], accept=None, desc: str = "requests") -> list[str | Failure]:
        """The reply to each conversation (from the cache when there), or a Failure. `accept(reply)` returning a
        reason makes a reply a failure that is neither retried nor cached (e.g. no parseable score)."""
        cached = self.load_cache()
        results: list[str | Failure | None] = [cached.get(self.key(m)) for m in conversations]
        todo = [i for i, r in enumerate(results) if r is None]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool, \
                tqdm(total=len(conversations), initial=len(conversations) - len(todo), desc=desc, unit="req") as bar:
            futures = {pool.submit(self.complete, conversations[i]): i for i in todo}
            for future in as_completed(futures):
                i = futures[future]
                reply = future.result()
                if isinstance(reply, str) and accept and (reason := accept(reply)):
                    reply = Failure(reason)
                elif isinstance(reply, str):
                    self._remember(self.key(conversations[i]), reply)
                results[i] = reply
                bar.update()
        return results

    def complete(self, messages: list[dict]) -> str | Failure:
        body = json.dumps({"model": self.model, "messages": messages, **self.params}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        reason = "no attempt"
        for attempt in range(self.retries + 1):
            wait = self.backoff * 2**attempt
            try:
                request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return _reply_text(json.loads(response.read()))
            except urllib.error.HTTPError as e:
                reason = f"HTTP {e.code}"
                if e.code not in RETRIED_STATUS:
                    return Failure(reason)
                wait = float(e.headers.get("Retry-After") or wait)
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                reason = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (ValueError, KeyError, IndexError, TypeError) as e:
                return Failure(f"not a chat-completions reply ({type(e).__name__})")
            if attempt < self.retries:
                time.sleep(wait)
        return Failure(f"{reason} after {self.retries + 1} attempts")

    def _remember(self, key: str, reply: str) -> None:
        if not self.cache:
            return
        with self._lock, open(self.cache, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "reply": reply}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _reply_text(payload: dict) -> str:
    content = payload["choices"][0]["message"]["content"]
    if not isinstance(content, str):
        raise TypeError("content is not text")
    return content
