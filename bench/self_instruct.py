"""The ROUGE-L novelty filter of `instructune data generate` against Alpaca's naive one (every candidate compared with
every kept instruction through rouge_score's LCS), on the same pools and candidates, in the same run.

Pools of kept instructions of 5K, 20K and 50K: the real instructions of `../shared/data/` (Alpaca 9K and Dolly 3K),
and, beyond them, instructions made of the first half of one real instruction and the second half of another (real
token statistics). Candidates: 200 instructions of the shared evaluation prompt sets, none in the pools. For each pool,
the time per candidate of a decision (the fast filter: `NoveltyFilter.nearest(..., stop_above=0.7)`; the naive one:
rouge_score's LCS against every kept one, on a sample of candidates: it is slow), and that both decide the same.

A whole run to 50K kept makes 50K decisions against pools growing from 0 to 50K: its time is the integral of the
time per candidate over the pool size, estimated from the three pools (piecewise linear), for both filters.

    .venv/bin/python bench/self_instruct.py          # ~3 minutes on 2 CPU cores

Last line, machine-readable: speedup_50k=… (naive ÷ fast, time per candidate at a 50K pool) run_speedup_50k=…
(the same for a whole run to 50K kept)
"""

import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

from instructune.data.self_instruct import THRESHOLD, NoveltyFilter, naive_nearest, rouge_tokens  # noqa: E402

POOLS = (5_000, 20_000, 50_000)


def real_instructions() -> list[str]:
    records = json.loads((SHARED / "random_9k.json").read_text()) + json.loads((SHARED / "dolly_3k.json").read_text())
    return list(dict.fromkeys(r["instruction"].strip() for r in records if r["instruction"].strip()))


def candidates(count: int, pool: set[str]) -> list[str]:
    texts = []
    for name in ("vicuna_test_set.jsonl", "koala_test_set.jsonl", "sinstruct_test_set.jsonl", "wizardlm_test_set.jsonl"):
        for line in (SHARED / name).read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                text = (record.get("instruction") or record.get("Instruction") or record.get("text") or
                        record.get("prompt") or "")
                if text.strip() and text not in pool:
                    texts.append(text.strip())
    return random.Random(0).sample(texts, min(count, len(texts)))


def pool_of(size: int, real: list[str]) -> list[str]:
    generator, texts = random.Random(1), list(real[:size])
    while len(texts) < size:
        a, b = generator.sample(real, 2)
        wa, wb = a.split(), b.split()
        texts.append(" ".join(wa[: len(wa) // 2] + wb[len(wb) // 2:]))
    return texts


def main() -> None:
    if not SHARED.exists():
        sys.exit(f"skipped: {SHARED} is absent (the shared data folder is not beside the repo)")
    real = real_instructions()
    asked = candidates(200, set(real))
    asked_tokens = [rouge_tokens(t) for t in asked]
    fast_s, naive_s = {}, {}
    for size in POOLS:
        texts = pool_of(size, real)
        started = time.perf_counter()
        fast = NoveltyFilter(texts)
        indexing = time.perf_counter() - started
        started = time.perf_counter()
        decisions = [fast.nearest(tokens, stop_above=THRESHOLD)[1] > THRESHOLD for tokens in asked_tokens]
        fast_s[size] = (time.perf_counter() - started) / len(asked)
        sample = 20 if size <= 5_000 else 6
        started = time.perf_counter()
        naive = [naive_nearest(fast.tokens, tokens)[1] > THRESHOLD for tokens in asked_tokens[:sample]]
        naive_s[size] = (time.perf_counter() - started) / sample
        assert naive == decisions[:sample], "the fast filter decided differently"
        print(f"pool {size:6,}: fast {fast_s[size] * 1000:7.2f} ms a candidate ({len(asked)} candidates, "
              f"{sum(decisions)} too similar; indexing the pool {indexing:.1f} s), naive {naive_s[size] * 1000:8.1f} ms "
              f"({sample} candidates, same decisions): {naive_s[size] / fast_s[size]:.0f}x", flush=True)

    def run_time(per_candidate: dict[int, float]) -> float:
        """Seconds for decisions against pools 0..50K: the integral of the piecewise-linear time per candidate."""
        points = [(0, 0.0)] + sorted(per_candidate.items())
        return sum((b - a) * (ta + tb) / 2 for (a, ta), (b, tb) in zip(points, points[1:]))

    fast_run, naive_run = run_time(fast_s), run_time(naive_s)
    print(f"a whole run to {POOLS[-1]:,} kept: fast ~{fast_run / 60:.1f} min, naive ~{naive_run / 3600:.1f} h "
          "(one process; Alpaca spread the naive one over a process pool)")
    print(f"speedup_50k={naive_s[POOLS[-1]] / fast_s[POOLS[-1]]:.0f} run_speedup_50k={naive_run / fast_run:.0f}")


if __name__ == "__main__":
    main()
