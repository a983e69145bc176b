"""vLLM's scheduling arguments: scheduling_policy="priority" with generate(priority=...), and
enable_chunked_prefill=False (every prompt computed in one step)."""

import pytest

from kiln import LLM, SamplingParams

TINY = dict(enforce_eager=True, dtype="float32", kv_cache_memory_bytes=2**24, max_model_len=128)
PARAMS = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


def test_priority_orders_admission(tiny_checkpoint):
    prompts = [[100 + i, 200 + i, 300 + i] for i in range(4)]
    with LLM(tiny_checkpoint("llama"), scheduling_policy="priority", max_num_seqs=1, **TINY) as llm:
        outs = llm.generate(prompts, PARAMS, use_tqdm=False, priority=[3, 0, 2, 1])
        assert [o.prompt_token_ids for o in outs] == prompts  # results stay in input order
        order = sorted(range(4), key=lambda i: outs[i].metrics.first_scheduled_time)
        assert order == [1, 3, 2, 0]
        fcfs = llm.generate(prompts, PARAMS, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in fcfs] == [o.outputs[0].token_ids for o in outs]


def test_priority_needs_the_priority_policy(tiny_checkpoint):
    with LLM(tiny_checkpoint("llama"), **TINY) as llm:
        assert len(llm.generate(["a", "b"], PARAMS, use_tqdm=False, priority=[0, 0])) == 2
        with pytest.raises(ValueError, match="got priority 1 but priority scheduling is not enabled"):
            llm.generate(["a", "b"], PARAMS, use_tqdm=False, priority=[1, 0])
        with pytest.raises(ValueError, match="priority: got 1 values for 2 prompts"):
            llm.generate(["a", "b"], PARAMS, use_tqdm=False, priority=[0])
        assert not llm.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("policy, victim", [("priority", "low"), ("fcfs", "high")])
def test_preemption_takes_the_lowest_priority_not_the_newest(tiny_checkpoint, policy, victim):
    block_bytes = 2 * 2 * 16 * 2 * 32 * 4  # one 16-token block of the tiny model in float32
    kwargs = dict(TINY, kv_cache_memory_bytes=6 * block_bytes, max_model_len=96)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    with LLM(tiny_checkpoint("llama"), scheduling_policy=policy, **kwargs) as llm:
        engine = llm.llm_engine
        preempted = []
        real = engine.scheduler._preempt
        engine.scheduler._preempt = lambda seq: (preempted.append(seq.request_id), real(seq))
        engine.add_request(
            "low", None, list(range(100, 130)), params, priority=2 if policy == "priority" else 0
        )
        for _ in range(3):
            engine.step()
        engine.add_request("high", None, list(range(200, 230)), params, priority=0)
        done = []
        while engine.has_unfinished_requests():
            done += engine.step()
        assert preempted and preempted[0] == victim
        assert sorted(len(o.outputs[0].token_ids) for o in done) == [40, 40]


def test_without_chunked_prefill_every_prompt_runs_whole(tiny_checkpoint):
    prompts = [list(range(100 + 50 * i, 140 + 50 * i)) for i in range(3)]
    with LLM(tiny_checkpoint("llama"), max_num_batched_tokens=64, **dict(TINY, max_model_len=64)) as llm:
        chunked = [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS, use_tqdm=False)]
    kwargs = dict(TINY, max_model_len=64)
    with LLM(
        tiny_checkpoint("llama"), enable_chunked_prefill=False, max_num_batched_tokens=64, **kwargs
    ) as llm:
        sched = llm.llm_engine.scheduler
        real, partial = sched.schedule, []

        def spy():
            batch = real()
            for seq, n in zip(batch.seqs, batch.num_new_tokens):
                if seq.num_computed_tokens + n != seq.num_tokens:
                    partial.append((seq.seq_id, n))
            return batch

        sched.schedule = spy
        whole = [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS, use_tqdm=False)]
        assert not partial
    assert whole == chunked
    with pytest.raises(
        ValueError, match="max_num_batched_tokens \\(32\\) is smaller than max_model_len \\(64\\)"
    ):
        LLM(tiny_checkpoint("llama"), enable_chunked_prefill=False, max_num_batched_tokens=32, **kwargs)
