"""Inference: a model folder (or a LoRA adapter) loaded for generation, the prompt built with the template the model
was trained with, and generation for a batch of requests at once, each with its own sampling, seed, token budget and
stop strings, its text streamed out as it becomes final. Used by `generate`, `serve`, the demo and `diff`'s check.

Batching is HF `generate` over left-padded prompts: per-request sampling runs in a logits processor that draws each
sampling row's token with that request's own generator and leaves only it standing, so generate's greedy pick takes
it (a seeded request gives the same tokens whatever it is batched with); per-request budgets, EOS and stop strings end
rows in a stopping criterion. The same Answer and Sampler follow each request in continuous batching (continuous.py),
which the server and answers.py use; `generate` is the static batch for the models it cannot serve.
"""

import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria

from instructune import run_summary
from instructune.data.formats import Message
from instructune.data.templates import TEMPLATES, render_prompt, template_adds_special_tokens
from instructune.errors import UserError
from instructune.modeling import adapters, models

logger = logging.getLogger("instructune")


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int | None = None  # None: a fresh random seed
    stop: tuple[str, ...] = ()  # text ends before the first of these; it is not part of the answer

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Request:
    prompt_ids: list[int]
    sampling: Sampling = field(default_factory=Sampling)
    on_text: Callable[[str], None] | None = None  # each new piece of the answer, once no stop string can take it back
    logprobs: int | None = None  # also score every token (prompt and answer) with this many alternatives
    cancelled: bool = False  # set from another thread to end the request early (a client that went away)


@dataclass
class TokenLogprob:
    token: str
    logprob: float | None  # None for the first prompt token, which nothing predicts
    top: dict[str, float] | None


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop": EOS or a stop string; "length": the token budget or the model's context
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None  # prompt tokens, then answer tokens


@dataclass
class Engine:
    model: object
    tokenizer: object
    name: str  # what the server calls it
    template: str  # alpaca | chat
    context_length: int

    @property
    def eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        return ids | ({self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())

    @property
    def pad_id(self) -> int:
        """What fills the left of shorter prompts (masked out): the pad token, else an EOS."""
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)

    def answer_for(self, request: Request) -> "Answer":
        """The request's answer to come, its budget capped by the context the prompt leaves."""
        budget = min(request.sampling.max_new_tokens, self.context_length - len(request.prompt_ids))
        return Answer(self.tokenizer, request, budget, self.eos_ids)

    def left_padded(self, requests: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, attention mask) of the prompts padded on the left: every prompt ends in the last column."""
        width = max(len(r.prompt_ids) for r in requests)
        input_ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, request in enumerate(requests):
            input_ids[i, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
            attention_mask[i, width - len(request.prompt_ids):] = 1
        return input_ids, attention_mask

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """The tokens that ask for the next assistant turn: Alpaca's template for one instruction when the model was
        trained with it (a system message, which that template has no place for, is left out), else the tokenizer's
        chat template, as in training."""
        turns = [m for m in messages if m.role != "system"]
        alpaca = self.template == "alpaca" and len(turns) == 1 and turns[0].role == "user"
        if not alpaca and not self.tokenizer.chat_template:
            raise UserError("this model's tokenizer has no chat template: send one user message (an instruction)")
        template = "alpaca" if alpaca else "chat"
        text = render_prompt(template, turns if alpaca else messages, self.tokenizer)
        return self.tokenizer(text, add_special_tokens=template_adds_special_tokens(template))["input_ids"]

    @property
    def vocabulary_size(self) -> int:
        """Token ids the model has embeddings for: a prompt of ids must stay below it."""
        return self.model.get_input_embeddings().num_embeddings

    def text_ids(self, text: str) -> list[int]:
        """A raw text prompt (completions): the tokenizer's own special tokens added, as vLLM does."""
        return self.tokenizer(text)["input_ids"]

    def check_fits(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise UserError("the prompt is empty")
        if len(prompt_ids) >= self.context_length:
            raise UserError(f"the prompt is {len(prompt_ids)} tokens; this model's context is {self.context_length} "
                            "tokens, prompt and answer together")

    @torch.inference_mode()
    def generate(self, requests: list[Request]) -> list[Completion]:
        """Answers for a batch of requests (prompts checked with check_fits)."""
        for request in requests:
            self.check_fits(request.prompt_ids)
        answers = [self.answer_for(r) for r in requests]
        longest = max(answer.budget for answer in answers)
        if longest > 0:
            input_ids, attention_mask = self.left_padded(requests)
            config = GenerationConfig(max_new_tokens=longest, do_sample=False, pad_token_id=self.pad_id,
                                      eos_token_id=sorted(self.eos_ids))
            self.model.generate(input_ids=input_ids.to(self.model.device),
                                attention_mask=attention_mask.to(self.model.device), generation_config=config,
                                logits_processor=[PerRequestSampler(requests)], stopping_criteria=[Rows(answers)])
        completions = [answer.completion() for answer in answers]
        scored = [(r, c) for r, c in zip(requests, completions) if r.logprobs is not None]
        if scored:
            for (request, completion), logprobs in zip(scored, self.score(
                    [r.prompt_ids + c.token_ids for r, c in scored], [r.logprobs for r, _ in scored])):
                completion.logprobs = logprobs
        return completions

    @torch.inference_mode()
    def score(self, sequences: list[list[int]], tops: list[int]) -> list[list[TokenLogprob]]:
        """Each token's log-probability given the ones before it, and the `top` likeliest tokens at each place."""
        width = max(len(s) for s in sequences)
        input_ids = torch.zeros((len(sequences), width), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, sequence in enumerate(sequences):  # right padding: positions start at 0 in every row
            input_ids[i, : len(sequence)] = torch.tensor(sequence)
            attention_mask[i, : len(sequence)] = 1
        logits = self.model(input_ids=input_ids.to(self.model.device),
                            attention_mask=attention_mask.to(self.model.device)).logits
        results = []
        for i, (sequence, top) in enumerate(zip(sequences, tops)):
            logprobs = torch.log_softmax(logits[i, : len(sequence) - 1].float(), dim=-1).cpu()  # a row at a time
            tokens = [self.tokenizer.decode([t]) for t in sequence]
            scored = [TokenLogprob(tokens[0], None, None)]
            for position in range(1, len(sequence)):
                row = logprobs[position - 1]
                alternatives = None
                if top:
                    best = torch.topk(row, top)
                    alternatives = {}
                    for value, token_id in zip(best.values.tolist(), best.indices.tolist()):
                        alternatives.setdefault(self.tokenizer.decode([token_id]), value)  # two ids, one text: the likelier
                scored.append(TokenLogprob(tokens[position], row[sequence[position]].item(), alternatives))
            results.append(scored)
        return results


class Sampler:
    """One request's draws: its temperature, top-k and top-p, with its own generator (seeded: the same draws whatever
    else is generated beside it)."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.generator = torch.Generator()
        self.generator.manual_seed(sampling.seed if sampling.seed is not None else secrets.randbits(63))

    def draw(self, scores: torch.Tensor) -> int:
        """The next token, drawn from one row of next-token scores."""
        sampling = self.sampling
        logits = scores.float().cpu() / sampling.temperature
        if sampling.top_k and sampling.top_k < logits.numel():
            logits[logits < torch.topk(logits, sampling.top_k).values[-1]] = -float("inf")
        if sampling.top_p < 1.0:
            ordered, order = torch.sort(logits, descending=True)
            probabilities = torch.softmax(ordered, dim=-1)
            drop = probabilities.cumsum(-1) - probabilities >= sampling.top_p  # keep the first token past top_p
            drop[0] = False  # the likeliest always stays (a top_p that rounds to 0 in float32 would drop it)
            logits[order[drop]] = -float("inf")
        return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=self.generator).item()


class PerRequestSampler(LogitsProcessor):
    """For `generate`: each sampling row's next token drawn by its request's Sampler; the row's scores then leave only
    that token, which generate's greedy choice takes. Greedy rows are left as they are."""

    def __init__(self, requests: list[Request]):
        self.samplers = [Sampler(r.sampling) for r in requests]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, sampler in enumerate(self.samplers):
            if not sampler.sampling.greedy:
                token = sampler.draw(scores[i])
                scores[i] = -float("inf")
                scores[i, token] = 0.0
        return scores


class Answer:
    """One request's answer as its tokens come: its text, when it ends and why, and what may be streamed."""

    def __init__(self, tokenizer, request: Request, budget: int, eos_ids: set[int]):
        self.tokenizer, self.request, self.budget, self.eos_ids = tokenizer, request, budget, eos_ids
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0  # characters of text already streamed
        self.finish: str | None = "length" if budget <= 0 else "stop" if request.cancelled else None

    def add(self, token: int) -> None:
        """The next generated token; it may end the answer (EOS, a stop string, the budget, a cancellation)."""
        self.tokens.append(token)  # EOS too: it is a generated token (counted, scored), not text
        if token in self.eos_ids:
            return self._end("stop")
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        stop = min((p for p in (self.text.find(s) for s in self.request.sampling.stop if s) if p >= 0), default=-1)
        if stop >= 0:
            self.text = self.text[:stop]
            self._end("stop")
        elif self.request.cancelled:
            self._end("stop")
        elif len(self.tokens) >= self.budget:
            self._end("length")
        else:
            self._stream(final=False)

    def _end(self, reason: str) -> None:
        self.finish = reason
        self._stream(final=True)

    def _stream(self, final: bool) -> None:
        """Send the text that is settled: not a half-decoded character, not the start of a possible stop string."""
        text, end = self.text, len(self.text)
        if not final:
            end -= 1 if text.endswith("\ufffd") else 0
            for stop in self.request.sampling.stop:
                for k in range(min(len(stop) - 1, end), 0, -1):
                    if text[:end].endswith(stop[:k]):
                        end -= k
                        break
        if end > self.sent and self.request.on_text:
            self.request.on_text(text[self.sent: end])
        self.sent = max(self.sent, end)

    def completion(self) -> Completion:
        if self.finish is None:  # generation ran out of new tokens before this answer's own check
            self._end("length")
        # A stop string ends the text; drop the tokens past it (they were generated but are not the answer).
        tokens = self.tokens
        while tokens and len(self.tokenizer.decode(tokens, skip_special_tokens=True)) > len(self.text):
            tokens = tokens[:-1]
        return Completion(self.text, tokens, self.finish, len(self.request.prompt_ids))


class Rows(StoppingCriteria):
    """For `generate`: each row's Answer fed its new token at every step; generation stops when all have ended."""

    def __init__(self, answers: list[Answer]):
        self.answers = answers

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        for i, answer in enumerate(self.answers):
            if answer.finish is None:
                answer.add(int(input_ids[i, -1]))
        return torch.tensor([a.finish is not None for a in self.answers], device=input_ids.device)


def load(name_or_path: str, adapter: str | None = None, template: str = "auto", name: str | None = None) -> Engine:
    """An engine on the GPU in bf16 when there is one, else on the CPU in fp32 (bf16 is many times slower than fp32 on
    CPUs without native bf16). `adapter`: a LoRA adapter folder merged into `name_or_path` (or into the base its config
    names, when `name_or_path` is itself the adapter). template='auto': the one the run saved, else alpaca."""
    path = models.resolve_model_path(name_or_path)
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    adapter = adapter or (path if adapters.is_adapter(path) else None)
    if adapter and not adapters.is_adapter(adapter):
        raise UserError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
    try:
        tokenizer = models.load_tokenizer(adapter or path)  # an adapter's tokenizer holds the tokens added in training
        if adapter:
            model = adapters.load_merged(adapter, tokenizer, dtype, base=None if adapter == path else path)
        else:
            model = models.load_model(path, dtype=dtype)
    except OSError as e:  # transformers' "not a model folder / not on the hub" errors
        raise UserError(f"{name_or_path}: cannot load the model: {e}".splitlines()[0]) from None
    model = model.to("cuda" if on_gpu else "cpu")
    if template == "auto":
        template = saved_template(adapter or path)
    return wrap(model, tokenizer, template, name or Path(adapter or path).name)


def wrap(model, tokenizer, template: str = "alpaca", name: str = "model") -> Engine:
    """An engine around a model already in memory, at the model's own context (its positions; the tokenizer's limit
    only for a model whose config has none): a model fine-tuned on shorter examples still serves its whole context."""
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    context = int(positions or min(tokenizer.model_max_length, 1 << 20))  # a tokenizer saved without a limit says 1e30
    return Engine(model.eval(), tokenizer, name, template, context)


def saved_template(path: str) -> str:
    """The prompt template a run trained the model with (its summary, in the folder or, for a merged adapter, the run
    folder around it); alpaca for any other model."""
    found = run_summary.find(path)
    if found and found[1].get("prompt_template") in TEMPLATES:
        logger.info("prompt template %s, as the model was trained (%s)", found[1]["prompt_template"], found[0])
        return found[1]["prompt_template"]
    return "alpaca"
