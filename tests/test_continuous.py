"""Continuous batching: whatever joins or leaves around it (staggered arrivals, prompts of very different lengths,
chunked prefills, cancellations), a greedy request gives exactly the tokens it gives alone and a seeded one draws
the same tokens; rows leave at the step they end and the cache shrinks after them; a newcomer's first token comes
while others still run; at most max_rows are in flight, the others wait in order; models with sliding-window caches
are served with static batches."""

import pytest
import torch
import transformers

from instructune.data.formats import Message
from instructune.inference.answers import generate_all
from instructune.inference.continuous import Scheduler, unsupported_reason
from instructune.inference.engine import Request, Sampling, load, wrap

QUESTIONS = ["Hi", "Give three tips for staying healthy. " * 12, "Translate the sentence: the cat sat on the mat.",
             "Name a colour.", "Write a long story about a lighthouse keeper and the sea. " * 4]


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_opt"])
def engine(request):
    return load(str(request.getfixturevalue(request.param)))


def prompt(engine, i):
    return engine.prompt_ids([Message("user", QUESTIONS[i])])


def run(scheduler, arrivals: dict[int, list[Request]], steps: int = 1000) -> tuple[dict, list]:
    """Steps the scheduler, adding each request at its step; (outcome by request id, rows in flight at each step)."""
    outcomes, in_flight = {}, []
    for step in range(steps):
        for request in arrivals.get(step, []):
            scheduler.add(request)
        for request, outcome in scheduler.step():
            outcomes[id(request)] = outcome
        in_flight.append(scheduler.in_flight)
        if not scheduler.busy and step > max(arrivals):
            return outcomes, in_flight
    raise AssertionError("the scheduler did not finish")


def test_staggered_arrivals_give_each_request_what_it_gives_alone(engine):
    samplings = [Sampling(max_new_tokens=14), Sampling(max_new_tokens=9), Sampling(12, temperature=1.0, top_p=0.9, seed=5),
                 Sampling(max_new_tokens=3), Sampling(20, temperature=0.8, top_k=20, seed=11)]
    alone = [engine.generate([Request(prompt(engine, i), samplings[i])])[0] for i in range(5)]
    assert len(set(map(len, (prompt(engine, i) for i in range(5))))) == 5  # very different lengths (tens to hundreds of tokens)
    requests = [Request(prompt(engine, i), samplings[i]) for i in range(5)]
    # chunks of 16 tokens: the long prompts take many steps to prefill, between the running rows' steps
    outcomes, _ = run(Scheduler(engine, max_rows=8, prefill_chunk=16),
                      {0: requests[:1], 2: requests[1:3], 5: requests[3:4], 9: requests[4:]})
    for request, reference in zip(requests, alone):
        completion = outcomes[id(request)]
        assert completion.token_ids == reference.token_ids and completion.text == reference.text
        assert completion.finish_reason == reference.finish_reason


def test_a_cancelled_request_leaves_and_the_others_are_unchanged(engine):
    greedy = Sampling(max_new_tokens=16)
    alone = [engine.generate([Request(prompt(engine, i), greedy)])[0].token_ids for i in (0, 2)]
    requests = [Request(prompt(engine, i), greedy) for i in (0, 1, 2)]
    scheduler = Scheduler(engine, max_rows=8)
    outcomes = {}
    for request in requests:
        scheduler.add(request)
    for step in range(100):
        if step == 4:
            requests[1].cancelled = True
        outcomes.update({id(r): o for r, o in scheduler.step()})
        if not scheduler.busy:
            break
    cancelled = outcomes[id(requests[1])]
    assert cancelled.finish_reason == "stop" and 0 < len(cancelled.token_ids) < 16
    assert [outcomes[id(requests[i])].token_ids for i in (0, 2)] == alone


def test_rows_leave_at_once_the_cache_shrinks_and_newcomers_start_at_once(engine):
    scheduler = Scheduler(engine, max_rows=8, prefill_chunk=64)
    long_lived = Request(prompt(engine, 0), Sampling(max_new_tokens=60))
    long_prompt = Request(prompt(engine, 1), Sampling(max_new_tokens=4))
    first_tokens = []
    newcomer = Request(prompt(engine, 3), Sampling(max_new_tokens=5), on_text=lambda piece: first_tokens.append(piece))
    scheduler.add(long_lived)
    widths, ended_at = [], {}
    for step in range(200):
        if step == 3:
            scheduler.add(long_prompt)
        if step == 20:
            scheduler.add(newcomer)
        for request, _ in scheduler.step():
            ended_at[id(request)] = step
        widths.append(scheduler.running.mask.shape[1] if scheduler.running else 0)
        if step == 22:
            assert first_tokens, "the newcomer's first token came within 3 steps while the other row runs"
            assert scheduler.running and long_lived in [row.request for row in scheduler.running.rows]
        if not scheduler.busy:
            break
    prefill_steps = -(-len(long_prompt.prompt_ids) // 64)
    # its first token ends its prefill, its second comes in that step's decoding, the last two in the next two steps
    assert ended_at[id(long_prompt)] == 3 + prefill_steps - 1 + 2  # and it left at the step it ended
    assert max(widths) >= len(long_prompt.prompt_ids)  # the short row was padded to the long prompt's width...
    assert widths[ended_at[id(long_prompt)] + 1] < len(long_prompt.prompt_ids)  # ...and the padding went with it
    assert ended_at[id(newcomer)] < ended_at[id(long_lived)]


def test_at_most_max_rows_are_in_flight_and_the_others_wait_in_order(engine):
    requests = [Request(prompt(engine, 3), Sampling(max_new_tokens=6)) for _ in range(5)]
    ends = []
    scheduler = Scheduler(engine, max_rows=2)
    for request in requests:
        scheduler.add(request)
    in_flight = []
    while scheduler.busy:
        ends += [next(i for i, r in enumerate(requests) if r is request) for request, _ in scheduler.step()]
        in_flight.append(scheduler.in_flight)
    assert max(in_flight) == 2 and ends == [0, 1, 2, 3, 4]


def test_sliding_window_models_get_static_batches(tiny_llama):
    tokenizer = load(str(tiny_llama)).tokenizer
    config = transformers.MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        sliding_window=8, max_position_embeddings=256)
    torch.manual_seed(0)
    engine = wrap(transformers.MistralForCausalLM(config), tokenizer)
    assert "DynamicSlidingWindowLayer" in unsupported_reason(engine)
    with pytest.raises(ValueError, match="continuous batching cannot serve this model"):
        Scheduler(engine, 4)
    requests = [Request(prompt(engine, i), Sampling(max_new_tokens=5)) for i in (0, 2, 3)]
    together = generate_all(engine, requests, max_rows=2)
    assert [c.token_ids for c in together] == [engine.generate([r])[0].token_ids for r in requests]
