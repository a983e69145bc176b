"""Tensor parallelism on the CPU (gloo, two ranks): the same greedy tokens and logprobs as one rank,
sharded weights, control calls across ranks, a rank that dies, bad input. Eager forward (fast on CPU).

A process holds one tensor-parallel LLM at a time: the tests that build their own come before the first
that uses the module's ``tp2``."""

import os
import signal
import time

import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.distributed import parallel_state
from kiln.distributed.sharding import check_tensor_parallel
from kiln.models.config import ModelConfig
from kiln.models.loader import read_config

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
PROMPTS = [{"prompt_token_ids": list(range(200 + 7 * i, 214 + 11 * i))} for i in range(4)]
BLOCK_BYTES_TP1 = 2 * 2 * 16 * 2 * 32 * 4  # K and V, 2 layers, 16 tokens, 2 KV heads of 32, fp32
BASE = dict(enforce_eager=True, max_model_len=128)
# the LLM runs on CUDA where there is a device: two ranks need two of them there
two_ranks = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="two ranks need two CUDA devices"
)


@pytest.fixture(scope="module", autouse=True)
def bounded_waits():
    """Every wait on another rank or replica ends within a minute (children inherit it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_DISTRIBUTED_TIMEOUT", "60")
        yield


def sampled(outputs):
    """(token ids, logprob of each sampled token) per request."""
    out = []
    for o in outputs:
        c = o.outputs[0]
        out.append((list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]))
    return out


def assert_same(reference, got):
    for (ref_ids, ref_lp), (ids, lp) in zip(reference, got, strict=True):
        assert ids == ref_ids
        assert max(abs(a - b) for a, b in zip(ref_lp, lp)) < 1e-4


def run(path, tp, prompts=PROMPTS, params=GREEDY, **kw):
    with LLM(path, tensor_parallel_size=tp, **BASE, **kw) as llm:
        return sampled(llm.generate(prompts, params, use_tqdm=False))


def rank_processes() -> list:
    import multiprocessing

    return [p for p in multiprocessing.active_children() if p.name.startswith("kiln-tp-rank")]


def no_rank_processes():
    return rank_processes() == []


@pytest.fixture(scope="module")
def kv1_checkpoint(tmp_path_factory, tokenizer_dir):
    """Llama with one KV head: two ranks each hold a copy of it."""
    from conftest import make_tiny_checkpoint

    return make_tiny_checkpoint(
        str(tmp_path_factory.mktemp("kv1")), "llama", tokenizer_dir, num_key_value_heads=1
    )


@pytest.fixture(scope="module")
def tp2(tiny_checkpoint):
    """Llama on two ranks with a KV cache of 8 blocks (prompts of these tests preempt each other)."""
    with LLM(
        tiny_checkpoint("llama"), tensor_parallel_size=2, kv_cache_memory_bytes=4 * BLOCK_BYTES_TP1, **BASE
    ) as llm:
        yield llm
    assert no_rank_processes()


# compilation_config=3 (Dynamo and Inductor, without the compile cache): the collectives inside one graph
COMPILED = {"mode": 3, "use_cache": False}


@two_ranks
@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3", "kv1"])
def test_two_ranks_match_one(arch, tiny_checkpoint, kv1_checkpoint):
    path = kv1_checkpoint if arch == "kv1" else tiny_checkpoint(arch)
    reference = run(path, 1, kv_cache_memory_bytes=2**22)
    if arch != "qwen2":
        assert_same(reference, run(path, 2, kv_cache_memory_bytes=2**22))
    else:  # compiled: the all-reduces and the gather inside the traced graph, no graph break
        kw = dict(BASE, enforce_eager=False, compilation_config=COMPILED, kv_cache_memory_bytes=2**22)
        with LLM(path, tensor_parallel_size=2, **kw) as llm:
            assert_same(reference, sampled(llm.generate(PROMPTS, GREEDY, use_tqdm=False)))
            report = llm.compile_report()
            assert report.graphs_captured == 1 and report.recompilations == 0
    assert no_rank_processes()


@two_ranks
def test_a_killed_rank_gives_an_error_not_a_hang(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("llama"), tensor_parallel_size=2, kv_cache_memory_bytes=2**22, **BASE)
    try:
        proc = llm.llm_engine.worker.ranks[0].proc
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"rank 1 \(pid \d+\) exited with code -9"):
            llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
        assert time.monotonic() - start < 30
        assert not llm.llm_engine.has_unfinished_requests()
    finally:
        llm.shutdown()
    assert no_rank_processes() and not torch.distributed.is_initialized()


@two_ranks
def test_chunked_prefill_under_two_ranks(tiny_checkpoint):
    """Prompts longer than a step's token budget are prefilled in chunks on both ranks."""
    path = tiny_checkpoint("llama")
    long_prompts = [{"prompt_token_ids": list(range(500 + 3 * i, 560 + 5 * i))} for i in range(3)]
    kw = dict(kv_cache_memory_bytes=2**22, enable_chunked_prefill=True, max_num_batched_tokens=24)
    reference = run(path, 1, prompts=long_prompts, **kw)
    with LLM(path, tensor_parallel_size=2, **BASE, **kw) as llm:
        assert llm.config.max_num_batched_tokens == 24  # every prompt (60+ tokens) takes several steps
        assert_same(reference, sampled(llm.generate(long_prompts, GREEDY, use_tqdm=False)))
    assert no_rank_processes()


def test_bad_input_names_the_numbers(tiny_checkpoint):
    cfg = ModelConfig.from_dict(read_config(tiny_checkpoint("llama")))  # 4 heads, 2 KV heads
    cpu = torch.device("cpu")
    with pytest.raises(
        ValueError, match="tensor_parallel_size=3 does not divide the model's 4 attention heads"
    ):
        LLM(tiny_checkpoint("llama"), tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer, got 0"):
        check_tensor_parallel(cfg, 0, None, cpu)
    with pytest.raises(
        ValueError, match="distributed_executor_backend must be None, 'uni', 'mp' or 'ray', got 'mpi'"
    ):
        LLM(tiny_checkpoint("llama"), tensor_parallel_size=2, distributed_executor_backend="mpi")
    with pytest.raises(
        ValueError, match="'uni' runs one process: tensor_parallel_size=2 needs 'mp' or 'ray'"
    ):
        LLM(tiny_checkpoint("llama"), tensor_parallel_size=2, distributed_executor_backend="uni")
    with pytest.raises(ValueError, match="data_parallel_size=2 with distributed_executor_backend='ray'"):
        LLM(tiny_checkpoint("llama"), data_parallel_size=2, distributed_executor_backend="ray")
    with pytest.raises(ValueError, match="data_parallel_size=2 with runner='pooling'"):
        LLM(tiny_checkpoint("llama"), data_parallel_size=2, runner="pooling")
    with pytest.raises(ValueError, match="data_parallel_size must be a positive integer, got 0"):
        LLM(tiny_checkpoint("llama"), data_parallel_size=0)
    check_tensor_parallel(cfg, 2, "ray", cpu)  # accepted
    devices = torch.cuda.device_count()
    if devices < 2:  # the device check, on a machine of fewer devices
        with pytest.raises(ValueError, match=f"tensor_parallel_size=2 exceeds the {devices} CUDA devices"):
            check_tensor_parallel(cfg, 2, "mp", torch.device("cuda"))
        with pytest.raises(
            ValueError, match=f"tensor_parallel_size=1 x data_parallel_size=2 exceeds the {devices} CUDA"
        ):
            check_tensor_parallel(cfg, 1, "mp", torch.device("cuda"), dp=2)
    assert no_rank_processes() and not torch.distributed.is_initialized()


@two_ranks
def test_llama_two_ranks_match_one_with_preemption_and_prefix_caching(tp2, tiny_checkpoint):
    path = tiny_checkpoint("llama")
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)
    # one rank with the same 8 blocks (its blocks hold twice the KV heads of a rank's)
    reference = run(path, 1, params=long, kv_cache_memory_bytes=8 * BLOCK_BYTES_TP1)
    assert tp2.llm_engine.num_blocks == 8
    before = tp2.llm_engine.scheduler.num_preemptions
    assert_same(reference, sampled(tp2.generate(PROMPTS, long, use_tqdm=False)))
    assert tp2.llm_engine.scheduler.num_preemptions > before
    kv = tp2.llm_engine.kv
    hits = kv.hits
    shared = [{"prompt_token_ids": list(range(300, 340)) + [400 + i]} for i in range(2)]
    first = sampled(tp2.generate(shared[:1], GREEDY, use_tqdm=False))
    second = sampled(tp2.generate(shared, GREEDY, use_tqdm=False))
    assert kv.hits > hits  # the shared 32-token prefix came from the cache
    assert_same(run(path, 1, prompts=shared, kv_cache_memory_bytes=2**22), second)
    assert second[0][0] == first[0][0]


@two_ranks
def test_each_rank_holds_its_shard(tp2, tiny_checkpoint):
    one = LLM(tiny_checkpoint("llama"), kv_cache_memory_bytes=2**22, **BASE)
    full = one.apply_model(lambda m: sum(p.numel() * p.element_size() for p in m.parameters()))[0]
    norms = one.apply_model(lambda m: sum(p.numel() for n, p in m.named_parameters() if "norm" in n))[0] * 4
    one.shutdown()
    sizes = tp2.collective_rpc(rank_weight_bytes)
    assert len(sizes) == 2 and sizes[0] == sizes[1]
    assert sizes[0] == (full - norms) // 2 + norms  # everything but the norms is split in two
    ranks = tp2.collective_rpc(rank_of)
    assert ranks == [0, 1]
    assert tp2.get_world_size() == 2 and tp2.get_world_size(include_dp=False) == 2
    assert tp2.collective_rpc("kv_bytes_per_block") == [BLOCK_BYTES_TP1 // 2] * 2
    with pytest.raises(ValueError, match="module-level function"):
        tp2.collective_rpc(lambda worker: 1)


def rank_weight_bytes(worker):
    return sum(p.numel() * p.element_size() for p in worker.model.parameters())


def rank_of(worker):
    return parallel_state.get().rank


def raise_on_rank_1(worker):
    if parallel_state.get().rank == 1:
        raise KeyError("boom")
    return 0


@two_ranks
def test_a_failing_call_on_another_rank_raises_on_rank_0(tp2):
    with pytest.raises(RuntimeError, match="rank 1 failed: KeyError"):
        tp2.collective_rpc(raise_on_rank_1)
    assert tp2.collective_rpc(rank_of) == [0, 1]  # still usable


@two_ranks
def test_sleep_and_wake_up_on_every_rank(tp2):
    reference = sampled(tp2.generate(PROMPTS[:2], GREEDY, use_tqdm=False))
    tp2.sleep(level=1)
    assert tp2.collective_rpc(lambda_free_asleep) == [True, True]
    tp2.wake_up()
    assert_same(reference, sampled(tp2.generate(PROMPTS[:2], GREEDY, use_tqdm=False)))


def last_sampled_tokens(worker):
    previous = worker.runner.previous
    return None if previous is None or previous.tokens is None else previous.tokens.tolist()


def lambda_free_asleep(worker):
    return bool(worker.asleep)


@two_ranks
def test_penalties_and_prompt_logprobs_under_two_ranks(tp2, tiny_checkpoint):
    """The sequences whose token lists do travel to the other ranks (kiln/distributed/executor.py)."""
    params = SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True, logprobs=2, repetition_penalty=1.5, prompt_logprobs=1
    )
    mixed = [params, GREEDY]  # one sequence with penalties, one without, in the same steps
    with LLM(tiny_checkpoint("llama"), kv_cache_memory_bytes=2**22, **BASE) as one:
        reference = one.generate(PROMPTS[:2], mixed, use_tqdm=False)
    got = tp2.generate(PROMPTS[:2], mixed, use_tqdm=False)
    assert_same(sampled(reference), sampled(got))
    ref_prompt = [
        lp[t].logprob for lp, t in zip(reference[0].prompt_logprobs[1:], PROMPTS[0]["prompt_token_ids"][1:])
    ]
    tp_prompt = [
        lp[t].logprob for lp, t in zip(got[0].prompt_logprobs[1:], PROMPTS[0]["prompt_token_ids"][1:])
    ]
    assert len(tp_prompt) == len(PROMPTS[0]["prompt_token_ids"]) - 1
    assert max(abs(a - b) for a, b in zip(ref_prompt, tp_prompt)) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_on_nccl_match_one_compiled_with_graphs(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    kw = dict(dtype="float32", max_model_len=128, kv_cache_memory_bytes=2**24)
    with LLM(path, **kw) as one:
        reference = sampled(one.generate(PROMPTS, GREEDY, use_tqdm=False))
    with LLM(path, tensor_parallel_size=2, **kw) as two:
        assert_same(reference, sampled(two.generate(PROMPTS, GREEDY, use_tqdm=False)))
        assert two.compile_report().recompilations == 0


@pytest.mark.parametrize(
    "kwargs, setting",
    [
        ({"quantization": "fp8"}, "quantization='fp8'"),
        ({"runner": "pooling"}, "runner='pooling'"),
        ({"enable_lora": True}, "enable_lora=True"),
    ],
)
def test_features_not_sharded_yet_are_refused_naming_both_settings(kwargs, setting, tiny_checkpoint):
    before = rank_processes()
    with pytest.raises(ValueError, match=rf"tensor_parallel_size=2 with {setting}: kiln does not shard it"):
        LLM(tiny_checkpoint("llama"), tensor_parallel_size=2, **BASE, **kwargs)
    assert rank_processes() == before  # refused before any rank started


@two_ranks
def test_structured_outputs_under_two_ranks(tp2, tiny_checkpoint):
    """A grammar step's bitmask reaches every rank, so all of them sample the same constrained token."""
    pytest.importorskip("xgrammar")
    choices = ["positive", "negative", "neutral"]
    params = SamplingParams(temperature=0, max_tokens=20, structured_outputs={"choice": choices})
    mixed = [params, GREEDY, params]
    with LLM(tiny_checkpoint("llama"), kv_cache_memory_bytes=2**22, **BASE) as one:
        reference = one.generate(PROMPTS[:3], mixed, use_tqdm=False)
    got = tp2.generate(PROMPTS[:3], mixed, use_tqdm=False)
    ids = [(list(o.outputs[0].token_ids), o.outputs[0].finish_reason) for o in got]
    assert ids == [(list(o.outputs[0].token_ids), o.outputs[0].finish_reason) for o in reference]
    assert got[0].outputs[0].text in choices and got[0].outputs[0].finish_reason == "stop"
    one_constrained = tp2.generate(PROMPTS[:1], params, use_tqdm=False)  # its last step is a grammar step
    assert one_constrained[0].outputs[0].token_ids == reference[0].outputs[0].token_ids
    last = tp2.collective_rpc(last_sampled_tokens)
    assert last[0] is not None and last[1] == last[0]  # rank 1 sampled the grammar step too
    assert_same(sampled(reference[1:2]), sampled(got[1:2]))
    # the ranks are still in step: a plain batch afterwards matches one rank
    assert_same(
        run(tiny_checkpoint("llama"), 1, kv_cache_memory_bytes=2**22),
        sampled(tp2.generate(PROMPTS, GREEDY, use_tqdm=False)),
    )


def weight_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


@two_ranks
def test_apply_model_reaches_every_rank(tp2, tiny_checkpoint):
    sizes = tp2.apply_model(weight_bytes)
    assert len(sizes) == 2 and sizes == tp2.collective_rpc(rank_weight_bytes)
    with pytest.raises(ValueError, match="module-level function"):
        tp2.apply_model(lambda model: 1)
    assert tp2.apply_model(weight_bytes) == sizes  # still usable
