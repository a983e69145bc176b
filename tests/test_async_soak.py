"""A bounded soak of ``AsyncLLM``: hundreds of requests from many coroutines with random lengths,
``n``, stop strings and random aborts (explicit, break, cancel). Every request ends, nothing escapes,
every KV block is free afterwards, and finished greedy requests match ``LLM.generate``."""

import asyncio
import random

import pytest

from kiln import AsyncLLM, SamplingParams

NUM_COROUTINES = 60
REQUESTS_PER_COROUTINE = 5
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "away", "quickly"]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    engine = AsyncLLM(
        model=tiny_checkpoint("llama"),
        enforce_eager=True,
        dtype="float32",
        max_model_len=96,
        max_num_seqs=64,
        kv_cache_memory_bytes=2**20,  # 64 blocks of 16: preemption happens under this load
    )
    yield engine
    engine.shutdown()


def random_request(rng: random.Random, name: str):
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
    params = SamplingParams(
        temperature=1.0,
        seed=rng.randint(0, 2**20),
        n=rng.choice([1, 1, 1, 2, 3]),
        max_tokens=rng.randint(1, 12),
        stop=rng.sample(["e", "an", "ing", "or", "s "], rng.randint(0, 2)),
        ignore_eos=rng.random() < 0.5,
    )
    # what happens to it: run to the end, abort, break, or cancel, after a few outputs
    fate = rng.choices(["finish", "abort", "break", "cancel"], weights=[6, 1, 1, 1])[0]
    return prompt, params, fate, rng.randint(0, 4), name


def test_soak(engine):
    rng = random.Random(1234)
    plans = [
        [random_request(rng, f"c{c}-r{r}") for r in range(REQUESTS_PER_COROUTINE)]
        for c in range(NUM_COROUTINES)
    ]
    ended: dict[str, str] = {}
    finished_outputs = {}

    async def one(prompt, params, fate, after, name):
        count = 0
        async for out in engine.generate(prompt, params, name):
            count += 1
            if out.finished:
                reasons = {c.finish_reason for c in out.outputs}
                ended[name] = "abort" if "abort" in reasons else "finished"
                if ended[name] == "finished":
                    finished_outputs[name] = out
                return
            if count > after and fate == "abort":
                asyncio.get_running_loop().call_later(
                    rng.random() * 0.01, asyncio.ensure_future, engine.abort(name)
                )
                fate = "aborting"
            elif count > after and fate == "break":
                ended[name] = "broke"
                break

    async def coroutine(requests):
        for prompt, params, fate, after, name in requests:
            if fate == "cancel":
                task = asyncio.create_task(one(prompt, params, fate, after, name))
                await asyncio.sleep(rng.random() * 0.02)
                if not task.done():
                    task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    ended[name] = "cancelled"
            else:
                await one(prompt, params, fate, after, name)

    async def main():
        await asyncio.gather(*(coroutine(p) for p in plans))
        for _ in range(200):  # abandoned streams abort as their generators are closed
            state = await engine._call(
                lambda llm: (
                    llm.llm_engine.has_unfinished_requests(),
                    llm.llm_engine.kv.num_free_blocks,
                    llm.llm_engine.num_blocks,
                    len(llm.llm_engine.processor.requests),
                )
            )
            if not state[0] and state[1] == state[2]:
                break
            await asyncio.sleep(0.01)
        return state

    unfinished, free, total, requests = asyncio.run(main())
    names = [r[4] for plan in plans for r in plan]
    assert set(ended) == set(names)  # every request ended one way or another
    assert not unfinished and free == total and requests == 0
    assert engine.is_running and not engine.errored
    assert not engine._active and not engine._engine.streams
    assert sum(v == "finished" for v in ended.values()) > len(names) // 2
    preemptions = asyncio.run(engine._call(lambda llm: llm.llm_engine.scheduler.num_preemptions))
    assert preemptions > 0, "the soak should exercise preemption"
    # finished requests are what LLM.generate gives for them alone (fp32, seeded)
    plan_of = {r[4]: r for plan in plans for r in plan}
    check = sorted(finished_outputs)[:40]
    want = asyncio.run(
        engine._call(
            lambda llm: llm.generate(
                [plan_of[n][0] for n in check], [plan_of[n][1] for n in check], use_tqdm=False
            )
        )
    )
    for name, w in zip(check, want):
        got = finished_outputs[name]
        assert [(c.token_ids, c.text) for c in got.outputs] == [(c.token_ids, c.text) for c in w.outputs], (
            name
        )
