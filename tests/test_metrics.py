"""LLM.get_metrics(): vLLM's metric names and objects, equal to the known counts of scripted workloads."""

import random

import pytest

from kiln import LLM, SamplingParams
from kiln.runtime.metrics import buckets_1_2_5
from kiln.runtime.metrics_reader import Counter, Gauge, Histogram

BLOCK_BYTES = 2 * 2 * 16 * 2 * 32 * 4  # K and V, 2 layers, 16 tokens, 2 kv heads, head_dim 32, fp32


def make_llm(path, **kwargs):
    kwargs.setdefault("kv_cache_memory_bytes", 2**24)
    return LLM(path, enforce_eager=True, dtype="float32", disable_log_stats=False, **kwargs)


def metrics(llm) -> dict:
    """name (plus finished_reason for request_success) -> Counter value, Gauge value or Histogram."""
    out = {}
    for m in llm.get_metrics():
        assert m.labels["engine"] == "0"
        key = m.name if "finished_reason" not in m.labels else (m.name, m.labels["finished_reason"])
        assert key not in out
        out[key] = m if isinstance(m, Histogram) else m.value
    return out


def tokens(rng, n):
    return [rng.randrange(100, 5000) for _ in range(n)]


def test_metric_types_names_and_labels(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    with make_llm(path) as llm:
        found = {m.name: type(m) for m in llm.get_metrics()}
        assert all(m.labels["model_name"] == path for m in llm.get_metrics())
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert found[name] is Gauge
    counters = ("prompt_tokens", "generation_tokens", "request_success", "num_preemptions")
    for name in counters + ("prefix_cache_queries", "prefix_cache_hits"):
        assert found["vllm:" + name] is Counter
    for name in (
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_prompt_tokens",
        "request_generation_tokens",
    ):
        assert found["vllm:" + name] is Histogram


def test_counts_of_a_scripted_workload(tiny_checkpoint):
    rng = random.Random(0)
    lengths = [5, 9, 17, 33]
    prompts = [tokens(rng, n) for n in lengths]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with make_llm(tiny_checkpoint("llama"), max_model_len=256) as llm:
        before = metrics(llm)
        assert before["vllm:prompt_tokens"] == before["vllm:generation_tokens"] == 0
        assert before["vllm:time_to_first_token_seconds"].count == 0
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
        m = metrics(llm)
        assert m["vllm:prompt_tokens"] == sum(lengths)
        assert m["vllm:generation_tokens"] == 4 * 6
        assert m[("vllm:request_success", "length")] == 4
        assert m[("vllm:request_success", "stop")] == m[("vllm:request_success", "abort")] == 0
        assert m["vllm:num_preemptions"] == 0
        ttft, itl = m["vllm:time_to_first_token_seconds"], m["vllm:inter_token_latency_seconds"]
        assert ttft.count == 4 and itl.count == 4 * 5
        for hist in (ttft, itl, m["vllm:e2e_request_latency_seconds"], m["vllm:request_queue_time_seconds"]):
            assert hist.buckets["+Inf"] == hist.count and hist.sum >= 0
            counts = list(hist.buckets.values())
            assert counts == sorted(counts)  # cumulative
        prompt_hist = m["vllm:request_prompt_tokens"]
        assert prompt_hist.count == 4 and prompt_hist.sum == sum(lengths)
        assert prompt_hist.buckets["5.0"] == 1 and prompt_hist.buckets["10.0"] == 2
        assert prompt_hist.buckets["20.0"] == 3 and prompt_hist.buckets["50.0"] == 4
        gen_hist = m["vllm:request_generation_tokens"]
        assert gen_hist.count == 4 and gen_hist.sum == 24 and gen_hist.buckets["5.0"] == 0
        assert m["vllm:num_requests_running"] == m["vllm:num_requests_waiting"] == 0
        assert m["vllm:kv_cache_usage_perc"] == 0.0
        # every prompt was looked up once, none shared a block with another
        assert m["vllm:prefix_cache_queries"] == sum(lengths) and m["vllm:prefix_cache_hits"] == 0

        # a shared 32-token prefix (two full blocks of 16): the second request finds both
        prefix = tokens(rng, 32)
        for suffix in (tokens(rng, 8), tokens(rng, 8)):
            llm.generate({"prompt_token_ids": prefix + suffix}, greedy, use_tqdm=False)
        m = metrics(llm)
        assert m["vllm:prefix_cache_queries"] == sum(lengths) + 2 * 40
        assert m["vllm:prefix_cache_hits"] == 32

        # stop reasons: a stop token taken from the greedy output, a stop string, and n=2 samples
        prompt = {"prompt_token_ids": tokens(rng, 7)}
        reference = llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0]
        stop_token = reference.token_ids[2]
        stop_at = reference.token_ids.index(stop_token) + 1
        before = metrics(llm)
        outs = llm.generate(
            [prompt, prompt, {"prompt_token_ids": tokens(rng, 3)}],
            [
                SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[stop_token]),
                SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, stop=[reference.text[:3]]),
                SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=4, ignore_eos=True),
            ],
            use_tqdm=False,
        )
        m = metrics(llm)
        assert outs[0].outputs[0].finish_reason == "stop" and len(outs[0].outputs[0].token_ids) == stop_at
        assert outs[1].outputs[0].finish_reason == "stop"
        delta = {k: m[k] - before[k] for k in m if not isinstance(m[k], Histogram)}
        assert delta[("vllm:request_success", "stop")] == 2
        assert delta[("vllm:request_success", "length")] == 2  # each of the n=2 samples counts
        generated = stop_at + len(outs[1].outputs[0].token_ids) + 2 * 4
        assert delta["vllm:generation_tokens"] == generated
        assert delta["vllm:prompt_tokens"] == 7 + 7 + 2 * 3
        ttft = m["vllm:time_to_first_token_seconds"].count - before["vllm:time_to_first_token_seconds"].count
        itl = m["vllm:inter_token_latency_seconds"].count - before["vllm:inter_token_latency_seconds"].count
        assert ttft == 4 and itl == generated - 4


def test_preemption_counts_and_gauges_while_stepping(tiny_checkpoint):
    """Three 16-token blocks, two 16-token prompts growing to 32 computed tokens each: the second is
    preempted once when both need their second block, and recomputed after the first finishes."""
    rng = random.Random(1)
    params = SamplingParams(temperature=0, max_tokens=17, ignore_eos=True)
    kwargs = dict(kv_cache_memory_bytes=3 * BLOCK_BYTES, max_model_len=48)
    with make_llm(tiny_checkpoint("llama"), **kwargs) as llm:
        engine = llm.llm_engine
        for i in range(2):
            engine.add_request(str(i), None, tokens(rng, 16), params)
        engine.step()  # both prefill: one block each
        m = metrics(llm)
        assert m["vllm:num_requests_running"] == 2 and m["vllm:num_requests_waiting"] == 0
        assert m["vllm:kv_cache_usage_perc"] == pytest.approx(2 / 3)
        assert m["vllm:num_preemptions"] == 0
        engine.step()  # the first takes the last block; the second is preempted
        m = metrics(llm)
        assert m["vllm:num_requests_running"] == 1 and m["vllm:num_requests_waiting"] == 1
        assert m["vllm:num_preemptions"] == 1
        assert m["vllm:kv_cache_usage_perc"] == pytest.approx(2 / 3)
        finished = []
        while engine.has_unfinished_requests():
            finished += engine.step()
        assert [len(o.outputs[0].token_ids) for o in finished] == [17, 17]
        m = metrics(llm)
        assert m["vllm:num_preemptions"] == 1
        assert m["vllm:prompt_tokens"] == 32  # the recomputed prompt is not counted again
        assert m["vllm:generation_tokens"] == 34
        assert m["vllm:inter_token_latency_seconds"].count == 32
        assert m[("vllm:request_success", "length")] == 2
        assert m["vllm:num_requests_running"] == m["vllm:num_requests_waiting"] == 0
        assert m["vllm:kv_cache_usage_perc"] == 0.0


class _FailingBar:
    """A progress bar that interrupts generate when the first request finishes."""

    def __init__(self, **kwargs):
        self.postfix = ""

    def update(self, n):
        raise KeyboardInterrupt

    def close(self):
        pass


def test_interrupted_generate_counts_aborts(tiny_checkpoint):
    rng = random.Random(2)
    with make_llm(tiny_checkpoint("llama")) as llm:
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (1, 8, 8)]
        with pytest.raises(KeyboardInterrupt):
            llm.generate(
                [{"prompt_token_ids": tokens(rng, 4)} for _ in range(3)], params, use_tqdm=_FailingBar
            )
        m = metrics(llm)
        assert m[("vllm:request_success", "length")] == 1
        assert m[("vllm:request_success", "abort")] == 2
        assert m["vllm:num_requests_running"] == m["vllm:num_requests_waiting"] == 0
        assert m["vllm:kv_cache_usage_perc"] == 0.0
        assert llm.llm_engine.stats._last_token_time == {}
        # the engine stays usable and keeps counting
        llm.generate({"prompt_token_ids": tokens(rng, 4)}, params[1], use_tqdm=False)
        assert metrics(llm)[("vllm:request_success", "length")] == 2


def test_get_metrics_needs_stats(tiny_checkpoint):
    with LLM(tiny_checkpoint("llama"), enforce_eager=True, dtype="float32") as llm:
        assert llm.llm_engine.stats is None  # vLLM's default: disable_log_stats=True
        with pytest.raises(RuntimeError, match="disable_log_stats=False"):
            llm.get_metrics()
    with pytest.raises(ValueError, match="disable_log_stats must be a bool"):
        LLM(tiny_checkpoint("llama"), disable_log_stats="no")


def test_token_buckets():
    assert buckets_1_2_5(100) == [1, 2, 5, 10, 20, 50, 100]
    assert buckets_1_2_5(4) == [1, 2]


@pytest.mark.gpu
def test_counts_on_cuda_with_compiled_steps_and_graphs(tiny_checkpoint):
    """The default CUDA path (compiled forward, CUDA graphs, overlapped steps) counts the same."""
    rng = random.Random(3)
    lengths = [3, 20, 40]
    greedy = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    with LLM(tiny_checkpoint("llama"), disable_log_stats=False, kv_cache_memory_bytes=2**26) as llm:
        assert llm.llm_engine.async_scheduling
        llm.generate([{"prompt_token_ids": tokens(rng, n)} for n in lengths], greedy, use_tqdm=False)
        m = metrics(llm)
        assert m["vllm:prompt_tokens"] == sum(lengths)
        assert m["vllm:generation_tokens"] == 3 * 9
        assert m[("vllm:request_success", "length")] == 3
        assert m["vllm:time_to_first_token_seconds"].count == 3
        assert m["vllm:inter_token_latency_seconds"].count == 3 * 8
        assert m["vllm:kv_cache_usage_perc"] == 0.0
