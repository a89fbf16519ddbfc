"""A small client for OpenAI-compatible chat-completions endpoints, for many requests at once: a concurrency
limit, retries with exponential backoff on 429, 5xx, timeouts, dropped connections and replies cut short
(Retry-After honoured up to MAX_RETRY_AFTER), a deadline per request (not per socket read), and a resumable
on-disk cache so an interrupted run continues without paying twice.
Used by the data filter, the pairwise judge and Self-Instruct generation (which also speaks to completions
endpoints).

Only the standard library: a thread pool of http.client requests is plenty for a rate-limited remote API.
"""

import email.utils
import hashlib
import http.client
import json
import logging
import math
import os
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

logger = logging.getLogger("instructune")

RETRIED_STATUS = {408, 409, 429, 500, 502, 503, 504}
MAX_RETRY_AFTER = 120.0  # seconds: a server asking for longer (a day, say) is waited on this long, and told so


class HTTPStatus(Exception):
    def __init__(self, status: int, retry_after: str | None):
        super().__init__(f"HTTP {status}")
        self.status, self.retry_after = status, retry_after


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds from now (a number or an HTTP date); None when absent or unreadable (negative, NaN)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None or when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
        seconds = max(0.0, seconds)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


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
    completions: bool = False  # a completions endpoint: the one user message's text is sent as the prompt
    reply_of: Callable[[dict], str] | None = None  # what to keep of a reply (cached as is); default: its text

    def __post_init__(self):
        base = self.url.rstrip("/")
        path = "/completions" if self.completions else "/chat/completions"
        if self.completions and base.endswith("/chat/completions"):
            base = base.removesuffix("/chat/completions")
        self.endpoint = base if base.endswith(path) else base + path
        self._lock = threading.Lock()
        self._capped_once = False

    def key(self, messages: list[dict]) -> str:
        text = json.dumps({"model": self.model, "messages": messages, "params": self.params}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def load_cache(self) -> dict[str, str]:
        """Replies already paid for. A line torn by a kill is ignored, and ended, so that the next reply appended
        starts a line of its own instead of joining the torn one (and being lost with it)."""
        replies = {}
        if self.cache and self.cache.exists():
            text = self.cache.read_text(encoding="utf-8", errors="replace")
            for line in text.split("\n"):
                try:
                    entry = json.loads(line)
                    replies[entry["key"]] = entry["reply"]
                except (ValueError, KeyError, TypeError):
                    continue
            if text and not text.endswith("\n"):
                with open(self.cache, "a", encoding="utf-8") as f:
                    f.write("\n")
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
        asked = {"prompt": messages[-1]["content"]} if self.completions else {"messages": messages}
        body = json.dumps({"model": self.model, **asked, **self.params}).encode()
        reason = "no attempt"
        for attempt in range(self.retries + 1):
            wait = self.backoff * 2**attempt
            try:
                return (self.reply_of or reply_text)(json.loads(self._post(body)))
            except HTTPStatus as e:
                reason = str(e)
                if e.status not in RETRIED_STATUS:
                    return Failure(reason)
                asked = retry_after_seconds(e.retry_after)
                wait = wait if asked is None else self._capped(asked)
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
                reason = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            except (ValueError, KeyError, IndexError, TypeError) as e:
                return Failure(f"not a chat-completions reply ({type(e).__name__})")
            if attempt < self.retries:
                time.sleep(wait)
        return Failure(f"{reason} after {self.retries + 1} attempts")

    def _post(self, body: bytes) -> bytes:
        """The response body of one POST, within `timeout` seconds in all (a server that trickles its reply is cut
        off at the deadline, not after `timeout` per read)."""
        deadline = time.monotonic() + self.timeout
        url = urllib.parse.urlsplit(self.endpoint)
        connection_class = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        connection = connection_class(url.netloc, timeout=self.timeout)
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})}
        try:
            connection.request("POST", url.path + (f"?{url.query}" if url.query else ""), body=body, headers=headers)
            sock = connection.sock  # the response reads from it even after the connection lets go of it
            response = connection.getresponse()
            if response.status != 200:
                raise HTTPStatus(response.status, response.getheader("Retry-After"))
            chunks = []
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no complete reply within {self.timeout:g} s")
                sock.settimeout(left)
                chunk = response.read1(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
            if response.length:  # a Content-Length that the body did not reach
                raise http.client.IncompleteRead(b"".join(chunks), response.length)
            return b"".join(chunks)
        finally:
            connection.close()

    def _capped(self, seconds: float) -> float:
        if seconds <= MAX_RETRY_AFTER:
            return seconds
        if not self._capped_once:
            self._capped_once = True
            logger.warning("the endpoint asked to wait %.0f s before retrying (Retry-After); waiting %g s instead",
                           seconds, MAX_RETRY_AFTER)
        return MAX_RETRY_AFTER

    def _remember(self, key: str, reply: str) -> None:
        if not self.cache:
            return
        with self._lock, open(self.cache, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "reply": reply}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def reply_text(payload: dict) -> str:
    """The text of a chat-completions or completions reply."""
    choice = payload["choices"][0]
    content = choice["message"]["content"] if "message" in choice else choice["text"]
    if not isinstance(content, str):
        raise TypeError("content is not text")
    return content
