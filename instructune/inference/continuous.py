"""Continuous batching (iteration-level scheduling, as Orca, vLLM, TGI and SGLang do it): a request joins the
running batch as soon as its prompt is prefilled and leaves the moment it ends, so a request that arrives while others
generate gets its first token within a few steps instead of after the whole batch.

The rows in flight share one KV cache (transformers' DynamicCache), left-padded to a common width: a row's attention
mask hides its padding and its position ids count only its own tokens, so a row computes what it computes alone
(greedy rows give the same tokens; seeded ones draw from their own generator). Newcomers are prefilled together, in
chunks of `prefill_chunk` tokens counted back from the prompts' ends (the same split whatever the padding), one chunk
between two decoding steps of the running rows, so a long prompt does not stall every stream; then they are merged
into the running cache. Finished rows are dropped from it at once, and the columns only padding still uses are
trimmed.

Models whose cache layers are not plain (sliding-window or hybrid layers cannot be padded and merged this way) are
served with static batches (Engine.generate); `unsupported_reason` says why.
"""

import collections
import inspect
import logging

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from instructune.inference.engine import Completion, Engine, Request, Sampler

logger = logging.getLogger("instructune")

PREFILL_CHUNK = 256  # prompt tokens per row and prefill step: bounds how long one step may hold the running rows
TRIM_COLUMNS = 32  # padding columns left of every row before the cache is trimmed (a copy of the cache)


def unsupported_reason(engine: Engine) -> str | None:
    """Why this model's cache cannot be merged across requests (None: it can)."""
    if engine.model.config.is_encoder_decoder:
        return "an encoder-decoder model"
    layers = DynamicCache(config=engine.model.config).layers
    if any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
        return f"its cache has {', '.join(kinds)} layers (sliding-window or hybrid attention)"
    if "position_ids" not in inspect.signature(engine.model.forward).parameters:
        return "its forward takes no position ids"
    return None


class Row:
    """A request in flight: its answer so far and its sampler."""

    def __init__(self, engine: Engine, request: Request):
        self.request = request
        self.answer = engine.answer_for(request)
        self.sampler = Sampler(request.sampling)
        self.failure: Exception | None = None  # its draw failed: it ends with this error


class Flight:
    """Rows whose keys and values share one cache: `mask` [rows, width] marks each row's real tokens in it and `last`
    [rows] is each row's newest token, not yet fed to the model."""

    def __init__(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor, last: torch.Tensor):
        self.rows, self.cache, self.mask, self.last = rows, cache, mask, last

    def keep(self, kept: list[int]) -> None:
        """Only these rows stay; then the columns no row uses any more are cut away."""
        if len(kept) < len(self.rows):
            index = torch.tensor(kept, dtype=torch.long, device=self.mask.device)
            self.cache.batch_select_indices(index)
            self.rows, self.mask, self.last = [self.rows[i] for i in kept], self.mask[index], self.last[index]
        unused = int(self.mask.any(0).int().argmax()) if self.rows else 0
        if unused >= TRIM_COLUMNS:
            self.cache = DynamicCache([(k[:, :, unused:], v[:, :, unused:]) for k, v in _layers(self.cache)])
            self.mask = self.mask[:, unused:]


class Scheduler:
    """Requests in, completions out, one step at a time: each step prefills a chunk of the newcomers' prompts (merging
    them into the running rows once done) and decodes one token for every running row. At most `max_rows` requests are
    in flight; the others wait in arrival order."""

    def __init__(self, engine: Engine, max_rows: int, prefill_chunk: int = PREFILL_CHUNK):
        reason = unsupported_reason(engine)
        if reason:
            raise ValueError(f"continuous batching cannot serve this model: {reason}")
        self.engine, self.max_rows, self.prefill_chunk = engine, max_rows, prefill_chunk
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: Flight | None = None
        self.prefill: dict | None = None  # the newcomers being prefilled: rows, ids, mask, positions, cache, done
        self.solo: set[int] = set()  # requests (by id) to prefill alone: their group failed
        parameters = inspect.signature(engine.model.forward).parameters
        self.keeps_logits = "logits_to_keep" in parameters
        # transformers renamed past_key_values to cache (the old name warns until 5.40 and then goes)
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running or self.prefill)

    @property
    def in_flight(self) -> int:
        return len(self.running.rows if self.running else ()) + len(self.prefill["rows"] if self.prefill else ())

    def add(self, request: Request) -> None:
        self.engine.check_fits(request.prompt_ids)
        self.waiting.append(request)

    @torch.inference_mode()
    def step(self) -> list[tuple[Request, Completion | Exception]]:
        """One prefill chunk and one decoding step; the requests that ended in it, with their outcome."""
        ended: list[tuple[Request, Completion | Exception]] = []
        if self.prefill is None:
            self._admit(ended)
        if self.prefill is not None:
            self._prefill_chunk(ended)
        if self.running is not None:
            self._decode(ended)
        return [(request, self._scored(request, outcome)) for request, outcome in ended]

    # ---- the three parts of a step

    def _admit(self, ended: list) -> None:
        """The waiting requests that fit, in arrival order, become the next prefill group."""
        rows = []
        while self.waiting and self.in_flight + len(rows) < self.max_rows:
            request = self.waiting[0]
            if rows and id(request) in self.solo:
                break
            self.waiting.popleft()
            row = Row(self.engine, request)
            if row.answer.finish is not None:  # cancelled while waiting, or no room for a single token
                ended.append((request, row.answer.completion()))
                continue
            rows.append(row)
            if id(request) in self.solo:
                break
        if not rows:
            return
        ids, mask = self.engine.left_padded([row.request for row in rows])
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        device = self.engine.model.device
        self.prefill = {"rows": rows, "ids": ids.to(device), "mask": mask.to(device), "positions": positions.to(device),
                        "cache": DynamicCache(config=self.engine.model.config), "done": 0}

    def _prefill_chunk(self, ended: list) -> None:
        group = self.prefill
        width = group["ids"].shape[1]
        # Chunk edges counted back from the prompts' ends: a prompt is split the same way whatever the group's width.
        start = group["done"]
        end = start + ((width - start) % self.prefill_chunk or self.prefill_chunk)
        try:
            logits = self._forward(group["ids"][:, start:end], group["mask"][:, :end], group["positions"][:, start:end],
                                   group["cache"])
        except Exception as e:
            self.prefill = None
            self._failed(group["rows"], e, ended)
            return
        group["done"] = end
        if end < width:
            return
        self.prefill = None
        first = self._choose(group["rows"], logits, ended)
        flight = Flight(group["rows"], group["cache"], group["mask"], first)
        flight.keep(self._still_going(flight.rows, ended))
        if flight.rows:
            self.running = flight if self.running is None else _merge(self.running, flight)

    def _decode(self, ended: list) -> None:
        flight = self.running
        flight.mask = torch.cat([flight.mask, flight.mask.new_ones((len(flight.rows), 1))], dim=1)
        positions = flight.mask.sum(-1, keepdim=True) - 1
        try:
            logits = self._forward(flight.last[:, None], flight.mask, positions, flight.cache)
        except Exception as e:  # the model itself failed: every row in flight gets the error
            self.running = None
            logger.exception("a decoding step of %d rows failed", len(flight.rows))
            ended += [(row.request, e) for row in flight.rows]
            return
        flight.last = self._choose(flight.rows, logits, ended)
        flight.keep(self._still_going(flight.rows, ended))
        if not flight.rows:
            self.running = None

    # ---- helpers

    def _forward(self, ids, mask, positions, cache) -> torch.Tensor:
        """The next-token logits (float32) of each row after `ids`, its cache extended by them."""
        extra = {"logits_to_keep": 1} if self.keeps_logits else {}
        out = self.engine.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                **{self.cache_argument: cache}, **extra)
        return out.logits[:, -1].float()

    def _choose(self, rows: list[Row], logits: torch.Tensor, ended: list) -> torch.Tensor:
        """Each row's next token (greedy, or drawn with its own generator); a row whose draw fails ends with the error."""
        greedy = logits.argmax(-1).tolist()
        chosen = []
        for i, row in enumerate(rows):
            try:
                token = greedy[i] if row.request.sampling.greedy else row.sampler.draw(logits[i])
                row.answer.add(token)
            except Exception as e:
                row.failure, token = e, self.engine.pad_id
            chosen.append(token)
        return torch.tensor(chosen, device=logits.device)

    def _still_going(self, rows: list[Row], ended: list) -> list[int]:
        kept = []
        for i, row in enumerate(rows):
            if row.failure is not None:
                ended.append((row.request, row.failure))
            elif row.answer.finish is not None:
                ended.append((row.request, row.answer.completion()))
            else:
                kept.append(i)
        return kept

    def _failed(self, rows: list[Row], error: Exception, ended: list) -> None:
        """A prefill group failed: its requests go back to the front to be prefilled one by one, so that only a
        request that fails alone gets the error."""
        if len(rows) == 1:
            logger.error("prefill failed: %s: %s", type(error).__name__, error)
            ended.append((rows[0].request, error))
            return
        logger.warning("a prefill of %d requests failed (%s: %s); prefilling them one at a time", len(rows),
                       type(error).__name__, str(error)[:200])
        for row in reversed(rows):
            self.solo.add(id(row.request))
            self.waiting.appendleft(row.request)

    def _scored(self, request: Request, outcome):
        self.solo.discard(id(request))
        if isinstance(outcome, Completion) and request.logprobs is not None:
            outcome.logprobs = self.engine.score([request.prompt_ids + outcome.token_ids], [request.logprobs])[0]
        return outcome


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # transformers has no public accessor for a layer's tensors, nor a way to pad or join caches: read them here
    return [(layer.keys, layer.values) for layer in cache.layers]


def _merge(a: Flight, b: Flight) -> Flight:
    """One flight of both: the narrower one padded on the left to the wider one's width."""
    width = max(a.mask.shape[1], b.mask.shape[1])

    def padded(tensor: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - tensor.shape[dim]
        if not missing:
            return tensor
        shape = list(tensor.shape)
        shape[dim] = missing
        return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

    layers = [(torch.cat([padded(ka, 2), padded(kb, 2)]), torch.cat([padded(va, 2), padded(vb, 2)]))
              for (ka, va), (kb, vb) in zip(_layers(a.cache), _layers(b.cache))]
    return Flight(a.rows + b.rows, DynamicCache(layers), torch.cat([padded(a.mask, 1), padded(b.mask, 1)]),
                  torch.cat([a.last, b.last]))
