"""A soak of ``AsyncLLM``: many coroutines, each sending its requests one after another, with random
prompt lengths, ``n``, stops and fates (run to the end, ``abort``, a consumer that breaks, a cancelled
task). ``tests/test_async_soak.py`` runs hundreds of requests on a tiny model; ``benchmarks/async_soak.py``
runs 10,000 on a GPU. ``run_soak`` returns what the invariants need: how each request ended, the
finished outputs, and the engine's state once every abandoned stream has been aborted."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from kiln.runtime.sampling_params import SamplingParams

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "away", "quickly"]
FATES = ["finish", "abort", "break", "cancel"]


@dataclass(frozen=True)
class Plan:
    prompt: str | dict  # text, or {"prompt_token_ids": [...]}
    params: SamplingParams
    fate: str  # one of FATES
    after: int  # outputs seen before the fate strikes
    name: str  # the request id


def random_plans(
    rng: random.Random,
    num_coroutines: int,
    per_coroutine: int,
    max_prompt: int = 30,
    max_tokens: int = 12,
    vocab_size: int | None = None,
) -> list[list[Plan]]:
    """Each coroutine's requests. ``vocab_size`` None: text prompts of up to ``max_prompt`` words and
    stop strings (needs a tokenizer); else prompts of up to ``max_prompt`` token ids below it and stop
    token ids."""
    if max_prompt < 1 or max_tokens < 1:
        raise ValueError(f"max_prompt and max_tokens must be >= 1, got {max_prompt} and {max_tokens}")
    plans = []
    for c in range(num_coroutines):
        plans.append(
            [
                _random_plan(rng, f"c{c}-r{r}", max_prompt, max_tokens, vocab_size)
                for r in range(per_coroutine)
            ]
        )
    return plans


def _random_plan(
    rng: random.Random, name: str, max_prompt: int, max_tokens: int, vocab_size: int | None
) -> Plan:
    length = rng.randint(1, max_prompt)
    stops: dict = {}
    if vocab_size is None:
        prompt = " ".join(rng.choice(WORDS) for _ in range(length))
        stops["stop"] = rng.sample(["e", "an", "ing", "or", "s "], rng.randint(0, 2))
    else:
        prompt = {"prompt_token_ids": [rng.randrange(1, vocab_size) for _ in range(length)]}
        stops["stop_token_ids"] = [rng.randrange(1, vocab_size) for _ in range(rng.randint(0, 2))]
        stops["detokenize"] = False  # no tokenizer
    params = SamplingParams(
        temperature=1.0,
        seed=rng.randint(0, 2**20),
        n=rng.choice([1, 1, 1, 2, 3]),
        max_tokens=rng.randint(1, max_tokens),
        ignore_eos=rng.random() < 0.5,
        **stops,
    )
    fate = rng.choices(FATES, weights=[6, 1, 1, 1])[0]
    return Plan(prompt, params, fate, rng.randint(0, 4), name)


@dataclass
class SoakResult:
    ended: dict[str, str]  # request id -> "finished", "abort", "broke" or "cancelled"
    finished_outputs: dict  # request id -> its final RequestOutput (finished ones)
    unfinished: bool  # the engine still had requests after the settle wait
    free_blocks: int
    total_blocks: int
    requests_left: int  # requests the output processor still tracks
    preemptions: int
    seconds: float  # from the first request to the last stream's end


async def _settled_state(engine, timeout_s: float):
    """The engine's (unfinished, free blocks, blocks, tracked requests, preemptions) once abandoned
    streams (closed generators) have aborted their requests, or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = await engine._call(
            lambda llm: (
                llm.llm_engine.has_unfinished_requests(),
                llm.llm_engine.kv.num_free_blocks,
                llm.llm_engine.num_blocks,
                len(llm.llm_engine.processor.requests),
                llm.llm_engine.scheduler.num_preemptions,
            )
        )
        if (not state[0] and state[1] == state[2]) or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.01)


def run_soak(engine, plans: list[list[Plan]], rng: random.Random, settle_s: float = 5.0) -> SoakResult:
    """Run every coroutine's plan against ``engine`` (an ``AsyncLLM``) in a fresh event loop."""
    ended: dict[str, str] = {}
    finished_outputs = {}

    async def one(plan: Plan):
        count, fate = 0, plan.fate
        async for out in engine.generate(plan.prompt, plan.params, plan.name):
            count += 1
            if out.finished:
                reasons = {c.finish_reason for c in out.outputs}
                ended[plan.name] = "abort" if "abort" in reasons else "finished"
                if ended[plan.name] == "finished":
                    finished_outputs[plan.name] = out
                return
            if count > plan.after and fate == "abort":
                asyncio.get_running_loop().call_later(
                    rng.random() * 0.01, asyncio.ensure_future, engine.abort(plan.name)
                )
                fate = "aborting"
            elif count > plan.after and fate == "break":
                ended[plan.name] = "broke"
                break

    async def coroutine(requests: list[Plan]):
        for plan in requests:
            if plan.fate == "cancel":
                task = asyncio.create_task(one(plan))
                await asyncio.sleep(rng.random() * 0.02)
                if not task.done():
                    task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    ended[plan.name] = "cancelled"
            else:
                await one(plan)

    async def main():
        start = time.perf_counter()
        await asyncio.gather(*(coroutine(p) for p in plans))
        seconds = time.perf_counter() - start
        return seconds, await _settled_state(engine, settle_s)

    seconds, (unfinished, free, total, left, preemptions) = asyncio.run(main())
    return SoakResult(ended, finished_outputs, unfinished, free, total, left, preemptions, seconds)


def soak_problems(engine, plans: list[list[Plan]], result: SoakResult) -> list[str]:
    """The invariants a soak must keep, as the list of those broken (empty: all hold)."""
    names = {p.name for plan in plans for p in plan}
    problems = []
    if set(result.ended) != names:
        problems.append(f"{len(names - set(result.ended))} requests never ended")
    if result.unfinished or result.requests_left:
        problems.append(f"the engine still holds requests ({result.requests_left} tracked)")
    if result.free_blocks != result.total_blocks:
        problems.append(f"{result.total_blocks - result.free_blocks} KV blocks not freed")
    if not engine.is_running or engine.errored:
        problems.append("the engine is not running")
    if engine._active or engine._engine.streams:
        problems.append("streams left behind")
    return problems
