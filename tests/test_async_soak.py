"""A bounded soak of ``AsyncLLM``: hundreds of requests from many coroutines with random lengths,
``n``, stop strings and random aborts (explicit, break, cancel). Every request ends, nothing escapes,
every KV block is free afterwards, and finished greedy requests match ``LLM.generate``."""

import asyncio
import random

import pytest
from conftest import tiny_engine_kwargs

from kiln import AsyncLLM
from kiln.bench.soak import random_plans, run_soak, soak_problems

NUM_COROUTINES = 60
REQUESTS_PER_COROUTINE = 5


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    small = dict(max_model_len=96, max_num_seqs=64, kv_cache_memory_bytes=2**20)  # 64 blocks: preemption
    engine = AsyncLLM(**tiny_engine_kwargs(tiny_checkpoint("llama"), **small))
    yield engine
    engine.shutdown()


def test_soak(engine):
    rng = random.Random(1234)
    plans = random_plans(rng, NUM_COROUTINES, REQUESTS_PER_COROUTINE, max_tokens=24)
    result = run_soak(engine, plans, rng)
    assert soak_problems(engine, plans, result) == []
    assert len(result.ended) == NUM_COROUTINES * REQUESTS_PER_COROUTINE
    assert sum(v == "finished" for v in result.ended.values()) > len(result.ended) // 2
    assert result.preemptions > 0, "the soak should exercise preemption"
    finished_outputs = result.finished_outputs
    # finished requests are what LLM.generate gives for them alone (fp32, seeded)
    plan_of = {p.name: p for plan in plans for p in plan}
    check = sorted(finished_outputs)[:40]
    want = asyncio.run(
        engine._call(
            lambda llm: llm.generate(
                [plan_of[n].prompt for n in check], [plan_of[n].params for n in check], use_tqdm=False
            )
        )
    )
    for name, w in zip(check, want):
        got = finished_outputs[name]
        assert [(c.token_ids, c.text) for c in got.outputs] == [(c.token_ids, c.text) for c in w.outputs], (
            name
        )
