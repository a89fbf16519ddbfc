"""`instructune serve`'s HTTP app: OpenAI's /v1/models, /v1/chat/completions and /v1/completions over one engine,
and a chat page at /.

- Streams are framed as OpenAI frames them: `data: {chunk}` events (chat: `chat.completion.chunk` deltas, the role
  first, then content, then the finish reason; `stream_options.include_usage` adds a usage chunk), then `data: [DONE]`.
- /v1/completions takes text or token-id prompts (one or a list: one choice each) with `echo` and `logprobs`, so that
  lm-eval's `local-completions` log-likelihood tasks run through it.
- One thread owns the model. Requests wait in one first-come-first-served queue and are batched continuously
  (inference/continuous.py): a request's prompt is prefilled (in chunks, between the running rows' decoding steps)
  and it joins the running rows at the next step; a row leaves when it ends. At most max_batch_size rows are in
  flight. Models the scheduler cannot serve (sliding-window caches), and `--batching static`, get static batches:
  whatever waits when the model frees up is generated together. For heavy production traffic on GPUs, vLLM serves
  the same folders.
- Every bad request gets a 4xx with OpenAI's error body ({"error": {message, type, param, code}}), and the server
  keeps serving: bodies are parsed here, not by FastAPI, so that malformed JSON is a 400 like any other mistake.
- Chat messages may carry Alpaca's `input` beside `content` (an extension the page uses): a model trained with
  Alpaca's template gets exactly its two-field prompt.
- One request's failure is that request's alone: values that would fail inside the model (seeds out of range, a
  temperature that divides to infinity, token ids the model has no embedding for, unbounded stop lists) are 400s, and
  a batch that fails anyway is generated again row by row, so only the row that fails gets the error (a stream: an
  error event, then `[DONE]`). Bodies are counted while they are read; a client that goes away frees its row.
- Not reachable from web pages: POST bodies must be application/json (no CORS-free text/plain posts), and a server
  bound to loopback answers only loopback Host names (no DNS rebinding).
"""

import asyncio
import copy
import dataclasses
import ipaddress
import json
import logging
import queue
import secrets
import threading
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from instructune.data.formats import Message
from instructune.errors import UserError
from instructune.inference.continuous import Scheduler, unsupported_reason
from instructune.inference.engine import Completion, Engine, Request, Sampling

logger = logging.getLogger("instructune")
PAGE = Path(__file__).with_name("static") / "index.html"
MIN_TEMPERATURE = 1e-4


@dataclasses.dataclass
class Limits:
    max_batch_size: int = 16
    max_tokens: int = 1024  # the most one request may ask for
    max_request_bytes: int = 1_000_000
    max_queue: int = 256  # requests waiting or running; beyond it a 429 asks the client to retry
    batch_wait_ms: float = 20  # static batches: how long a request that finds the model idle waits for others to join
    api_key: str | None = None
    loopback_only: bool = True  # bound to loopback: answer only Host names of this machine (no DNS rebinding)
    max_stop: int = 4  # stop strings per request (OpenAI's limit)
    max_stop_length: int = 256  # characters per stop string
    batching: str = "continuous"  # or static: a request that arrives waits for the running batch to end


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---- request bodies (fields OpenAI defines that we do not use are accepted and ignored)

class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's defaults
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # an extension, as in vLLM
    n: int = 1
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch's generators take
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None

    @field_validator("temperature")
    @classmethod
    def not_vanishing(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:  # logits divided by it overflow to infinity
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return value


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]
    input: str = ""  # Alpaca's second field (an extension)

    def message(self) -> Message:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return Message("system" if self.role == "developer" else self.role, text, self.input)


class ChatBody(Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False


class CompletionBody(Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


# ---- the model's thread

DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there

@dataclasses.dataclass
class Job:
    request: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # text pieces, then a Completion (or an exception)
    streamed: int = 0  # characters of the answer put out so far
    produced: int = 0  # characters the current attempt has produced (a batch generated again starts over)

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def text(self, piece: str) -> None:
        """A piece of the answer, less what an earlier attempt already put out (an attempt again gives the same
        text: every request is seeded)."""
        self.produced += len(piece)
        if self.produced > self.streamed:
            self.put(piece[len(piece) - (self.produced - self.streamed):])
            self.streamed = self.produced


class Batcher:
    """The one thread that runs the model. Continuous batching (inference/continuous.py) where the model allows it:
    a request joins the running rows at the next step, up to max_batch_size rows in flight, the rest waiting in
    arrival order. Otherwise static batches: every job waiting when the model frees up (up to max_batch_size) is
    generated together."""

    def __init__(self, engine: Engine, limits: Limits):
        self.engine, self.limits = engine, limits
        self.waiting: queue.Queue[Job | None] = queue.Queue()
        self.in_hand: dict[int, Request] = {}  # submitted and not finished, by id()
        self.lock = threading.Lock()
        reason = unsupported_reason(engine) if limits.batching == "continuous" else "--batching static"
        if reason:
            logger.info("static batches of up to %d requests: %s", limits.max_batch_size, reason)
        else:
            logger.info("continuous batching: up to %d requests in flight", limits.max_batch_size)
        self.thread = threading.Thread(target=self._run_static if reason else self._run_continuous,
                                       name="instructune-model", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> Job:
        with self.lock:
            if len(self.in_hand) >= self.limits.max_queue:
                raise APIError(429, f"the server has {len(self.in_hand)} requests in hand; retry shortly",
                               type="rate_limit_error")
            self.in_hand[id(request)] = request
        if request.sampling.seed is None:  # seeded here, so that generating it again gives the same answer
            request.sampling = dataclasses.replace(request.sampling, seed=secrets.randbits(63))
        job = Job(request, asyncio.get_running_loop(), asyncio.Queue())
        request.on_text = job.text
        self.waiting.put(job)
        return job

    def stop(self, timeout: float = 30) -> None:
        """Cancel whatever is in hand (rows end at their next token) and let the model's thread end: a process must
        not exit while that thread is inside the model."""
        with self.lock:
            for request in self.in_hand.values():
                request.cancelled = True
        self.waiting.put(None)
        self.thread.join(timeout)

    def _gather(self, limit: int, idle: bool, wait_s: float = 0.0) -> tuple[list[Job], bool]:
        """Up to `limit` waiting jobs in arrival order, and whether stop() was called. `idle`: nothing runs, so wait for
        a first job, then `wait_s` for others to join it; else take only the jobs already there."""
        jobs, deadline = [], None
        while len(jobs) < limit:
            try:
                if idle and not jobs:
                    job = self.waiting.get()
                elif idle and wait_s:
                    job = self.waiting.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    job = self.waiting.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            deadline = deadline or time.monotonic() + wait_s
        return jobs, False

    def _release(self, jobs: list[Job]) -> None:
        with self.lock:
            for job in jobs:
                del self.in_hand[id(job.request)]

    def _run_continuous(self) -> None:
        scheduler = Scheduler(self.engine, self.limits.max_batch_size)
        jobs: dict[int, Job] = {}  # in the scheduler, by id() of their request
        stopping = False
        while not stopping or scheduler.busy:
            arrived, stopped = self._gather(self.limits.max_queue, idle=not scheduler.busy and not stopping)
            stopping |= stopped
            for job in arrived:
                jobs[id(job.request)] = job
                scheduler.add(job.request)  # its prompt was checked when it was submitted
            try:
                ended = scheduler.step()
            except Exception as e:  # not the model's failure (the scheduler answers those per request): a bug
                logger.exception("the scheduler failed; failing the %d requests it held", len(jobs))
                ended = [(job.request, e) for job in jobs.values()]
                scheduler = Scheduler(self.engine, self.limits.max_batch_size)
            for request, outcome in ended:
                job = jobs.pop(id(request))
                job.put(outcome)
                self._release([job])

    def _run_static(self) -> None:
        stopping = False
        while not stopping:
            # clients that arrive together go together: a later one would wait for the whole batch
            jobs, stopping = self._gather(self.limits.max_batch_size, idle=True, wait_s=self.limits.batch_wait_ms / 1000)
            live = [job for job in jobs if not job.request.cancelled]
            for job, outcome in zip(live, self._generate(live)):
                job.put(outcome)
            self._release(jobs)

    def _generate(self, jobs: list[Job]) -> list:
        """A Completion or an exception per job: a failing batch is generated again a row at a time, so that only the
        row that fails gets the error; never the server's failure."""
        if not jobs:
            return []
        for job in jobs:
            job.produced = 0
        try:
            return self.engine.generate([job.request for job in jobs])
        except Exception as e:
            if len(jobs) > 1:
                logger.warning("a batch of %d failed (%s: %s); generating its rows one at a time", len(jobs),
                               type(e).__name__, str(e)[:200])
                return [outcome for job in jobs for outcome in self._generate([job])]
            logger.exception("generation failed")
            return [e]


async def completion_of(job: Job, client: HTTPRequest) -> Completion:
    """The job's Completion; a client that goes away meanwhile frees its row at the next token."""
    clock = asyncio.get_running_loop().time
    next_check = clock() + DISCONNECT_POLL_S
    try:
        while True:
            try:
                item = await asyncio.wait_for(job.events.get(), timeout=max(0.0, next_check - clock()))
            except asyncio.TimeoutError:
                item = None
            if clock() >= next_check:  # text pieces may keep coming: look at the clock, not only at silences
                if await client.is_disconnected():
                    raise APIError(499, "the client closed the connection")
                next_check = clock() + DISCONNECT_POLL_S
            if isinstance(item, Exception):
                raise APIError(500, f"generation failed: {item}", type="server_error")
            if isinstance(item, Completion):
                return item
    finally:
        job.request.cancelled = True  # a no-op once it has finished


async def run_job(job: Job):
    """The job's text pieces as they come, then its Completion."""
    while True:
        item = await job.events.get()
        if isinstance(item, Exception):
            raise APIError(500, f"generation failed: {item}", type="server_error")
        yield item
        if isinstance(item, Completion):
            return


# ---- the app

class Guard:
    """Before any route: loopback Host names only when bound to loopback, JSON bodies only, and the API key on /v1/.
    (Plain ASGI, not Starlette's BaseHTTPMiddleware, whose wrapped receive hides a client's disconnect from routes.)"""

    def __init__(self, app, limits: Limits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send) -> None:
        error = self.refusal(scope) if scope["type"] == "http" else None
        if error is not None:
            await JSONResponse(error.body, status_code=error.status)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, scope) -> APIError | None:
        headers = Headers(scope=scope)
        if self.limits.loopback_only and not is_loopback(headers.get("host", "")):
            return APIError(403, "this server answers only requests addressed to this machine (Host: localhost or a "
                            "loopback address)", code="host_not_allowed")
        if scope["method"] == "POST" and headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return APIError(415, "the body must be JSON, sent as Content-Type: application/json")
        if self.limits.api_key and scope["path"].startswith("/v1/"):
            if headers.get("authorization", "") != f"Bearer {self.limits.api_key}":
                return APIError(401, "a valid API key is required: 'Authorization: Bearer KEY'",
                                type="authentication_error", code="invalid_api_key")
        return None


def create_app(engine: Engine, limits: Limits) -> FastAPI:
    app = FastAPI(title="instructune", docs_url=None, redoc_url=None, openapi_url=None)
    batcher = app.state.batcher = Batcher(engine, limits)
    prompts = dataclasses.replace(engine, tokenizer=copy.deepcopy(engine.tokenizer))  # the model's thread has its own
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        headers = {"Retry-After": "1"} if error.status == 429 else None
        return JSONResponse(error.body, status_code=error.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):  # 404, 405: in OpenAI's shape too
        return JSONResponse(APIError(error.status_code, str(error.detail)).body, status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request, error: Exception):
        logger.exception("request failed")
        return JSONResponse(APIError(500, f"internal error: {error}", type="server_error").body, status_code=500)

    app.add_middleware(Guard, limits=limits)

    async def read(request: HTTPRequest, schema: type[Body]) -> Body:
        def refuse_over(size: int) -> None:
            if size > limits.max_request_bytes:
                raise APIError(413, f"the request is too large: this server takes at most {limits.max_request_bytes} bytes")

        declared = request.headers.get("content-length", "")
        refuse_over(int(declared) if declared.isdigit() else 0)  # before reading it
        chunks, size = [], 0
        async for chunk in request.stream():  # counted while read: a chunked body declares no length
            size += len(chunk)
            refuse_over(size)
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            body = schema.model_validate_json(raw)
        except ValidationError as e:
            first = e.errors()[0]
            if first["type"] == "json_invalid":
                raise APIError(400, f"the body is not valid JSON: {first['msg']}") from None
            where = ".".join(str(p) for p in first["loc"])
            raise APIError(400, f"{where}: {first['msg']}", param=where) from None
        if body.model != engine.name:
            raise APIError(404, f"the model '{body.model}' does not exist; this server has '{engine.name}'",
                           param="model", code="model_not_found")
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        return body

    def sampling(body: Body, max_tokens: int | None, default: int) -> Sampling:
        max_tokens = default if max_tokens is None else max_tokens
        if max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}",
                           param="max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stop) > limits.max_stop or any(len(s) > limits.max_stop_length for s in stop):
            raise APIError(400, f"stop: at most {limits.max_stop} strings of at most {limits.max_stop_length} "
                           "characters", param="stop")
        return Sampling(max_tokens, body.temperature, body.top_p, body.top_k, body.seed, tuple(stop))

    def checked(prompt_ids: list[int], param: str = "messages") -> list[int]:
        if any(not 0 <= token < prompts.vocabulary_size for token in prompt_ids):
            bad = next(token for token in prompt_ids if not 0 <= token < prompts.vocabulary_size)
            raise APIError(400, f"token id {bad} is outside this model's vocabulary (0 to "
                           f"{prompts.vocabulary_size - 1})", param=param)
        try:
            prompts.check_fits(prompt_ids)
        except UserError as e:
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
        return prompt_ids

    def usage(completions: list[Completion]) -> dict:
        prompt, answer = sum(c.prompt_tokens for c in completions), sum(len(c.token_ids) for c in completions)
        return {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer}

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": created,
                                            "owned_by": "instructune"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        body = await read(request, ChatBody)
        if body.logprobs:
            raise APIError(400, "logprobs are served by /v1/completions", param="logprobs")
        try:
            prompt_ids = prompts.prompt_ids([m.message() for m in body.messages])
        except UserError as e:
            raise APIError(400, str(e), param="messages") from None
        job = batcher.submit(Request(checked(prompt_ids), sampling(body, body.max_completion_tokens or body.max_tokens, 256)))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.name}
        if not body.stream:
            completion = await completion_of(job, request)
            return {**head, "object": "chat.completion", "usage": usage([completion]), "choices": [{
                "index": 0, "message": {"role": "assistant", "content": completion.text},
                "finish_reason": completion.finish_reason, "logprobs": None}]}

        def chunk(delta: dict, finish: str | None = None) -> str:
            return sse({**head, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for item in run_job(job):
                    if isinstance(item, str):
                        yield chunk({"content": item})
                yield chunk({}, item.finish_reason)
                if (body.stream_options or {}).get("include_usage"):
                    yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage([item])})
            except APIError as error:  # the stream ends with the error, then [DONE], as OpenAI's streams do
                yield sse(error.body)
            finally:
                job.request.cancelled = True  # a client that went away stops its row at the next token
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def complete(request: HTTPRequest):
        body = await read(request, CompletionBody)
        if body.stream and (body.echo or body.logprobs is not None):
            raise APIError(400, "echo and logprobs are not streamed; ask without stream", param="stream")
        given = body.prompt
        if isinstance(given, str) or (given and isinstance(given[0], int)):
            given = [given]
        if not given:
            raise APIError(400, "prompt is empty", param="prompt")
        prompt_ids = [checked(p if isinstance(p, list) else prompts.text_ids(p), "prompt") for p in given]
        plan = sampling(body, body.max_tokens, 16)
        jobs = [batcher.submit(Request(ids, plan, logprobs=body.logprobs)) for ids in prompt_ids]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": engine.name}
        if body.stream:
            async def events():
                try:
                    for index, job in enumerate(jobs):  # generated together; streamed one after the other
                        async for item in run_job(job):
                            text, finish = (item, None) if isinstance(item, str) else ("", item.finish_reason)
                            yield sse({**head, "choices": [{"index": index, "text": text, "logprobs": None,
                                                            "finish_reason": finish}]})
                except APIError as error:
                    yield sse(error.body)
                finally:
                    for job in jobs:
                        job.request.cancelled = True
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        try:
            completions = [await completion_of(job, request) for job in jobs]
        finally:
            for job in jobs:
                job.request.cancelled = True
        choices = []
        for index, (ids, completion) in enumerate(zip(prompt_ids, completions)):
            text = completion.text
            logprobs = None
            if body.logprobs is not None:
                scored = completion.logprobs if body.echo else completion.logprobs[len(ids):]
                logprobs = logprobs_body(scored)
            if body.echo:
                text = prompts.tokenizer.decode(ids) + text
            choices.append({"index": index, "text": text, "logprobs": logprobs,
                            "finish_reason": completion.finish_reason})
        return {**head, "choices": choices, "usage": usage(completions)}

    return app


def logprobs_body(scored) -> dict:
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs and text_offset."""
    offsets, position = [], 0
    for entry in scored:
        offsets.append(position)
        position += len(entry.token)
    return {"tokens": [e.token for e in scored], "token_logprobs": [e.logprob for e in scored],
            "top_logprobs": [e.top for e in scored], "text_offset": offsets}


def is_loopback(host_header: str) -> bool:
    """Whether a Host header names this machine: localhost or a loopback address, with any port."""
    if host_header.startswith("["):  # [IPv6]:port
        host = host_header[1:host_header.find("]")]
    else:
        host = host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header
    host = host.lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
