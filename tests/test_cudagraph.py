"""CUDA graphs replay exactly what eager execution computes (the graph tests need a GPU)."""

import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.compiler.cudagraph import default_capture_sizes


def test_default_capture_sizes_ladder():
    assert default_capture_sizes(256)[:5] == [1, 2, 4, 8, 16]
    assert default_capture_sizes(256)[-1] == 256
    assert default_capture_sizes(512)[-3:] == [480, 496, 512]
    assert default_capture_sizes(6) == [1, 2, 4, 6]


def _generate(llm, prompts, max_tokens=10):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=1)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_graphs_match_eager_for_every_bucket(arch, tiny_checkpoint):
    path = tiny_checkpoint(arch)
    gen = torch.Generator().manual_seed(0)
    # batch sizes hitting every bucket of [1, 2, 4, 8], padded ones included (3, 5, 7)
    batches = [
        [
            torch.randint(5, 40000, (int(torch.randint(3, 40, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)
        ]
        for n in (1, 2, 3, 4, 5, 7, 8)
    ]
    kwargs = dict(dtype="float32", max_num_seqs=8, max_model_len=256)
    with LLM(path, enforce_eager=True, **kwargs) as eager:
        expected = [_generate(eager, b) for b in batches]
    with LLM(path, compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8]}, **kwargs) as graphed:
        assert graphed.llm_engine.runner.decode_graphs is not None
        assert sorted(graphed.llm_engine.runner.decode_graphs.graphs) == [1, 2, 4, 8]
        got = [_generate(graphed, b) for b in batches]
    for exp_batch, got_batch in zip(expected, got):
        for e, g in zip(exp_batch, got_batch):
            assert g.outputs[0].token_ids == e.outputs[0].token_ids
            for step_e, step_g, t in zip(
                e.outputs[0].logprobs, g.outputs[0].logprobs, e.outputs[0].token_ids
            ):
                assert abs(step_e[t].logprob - step_g[t].logprob) < 1e-3


@pytest.mark.gpu
def test_stale_buffers_do_not_leak_between_steps(tiny_checkpoint):
    """Different batches in the same bucket, back to back: a long batch then a short one."""
    path = tiny_checkpoint("llama")
    kwargs = dict(dtype="float32", max_num_seqs=8, max_model_len=256)
    long_batch = [list(range(100 + i, 160 + i)) for i in range(8)]
    short_batch = [[7, 8, 9], [11, 12], [300, 301, 302, 303, 304]]
    with LLM(path, enforce_eager=True, **kwargs) as eager:
        expected = _generate(eager, short_batch)
    with LLM(path, compilation_config={"cudagraph_capture_sizes": [4, 8]}, **kwargs) as graphed:
        _generate(graphed, long_batch)
        got = _generate(graphed, short_batch)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["piecewise", "full_and_piecewise"])
def test_piecewise_graphs_match_eager_for_prefill_and_mixed_batches(mode, tiny_checkpoint):
    path = tiny_checkpoint("qwen3")
    kwargs = dict(dtype="float32", max_num_seqs=8, max_model_len=256, max_num_batched_tokens=64)
    prompts = [list(range(300 + 7 * i, 300 + 7 * i + 5 + 9 * i)) for i in range(6)]  # 5..50 tokens
    with LLM(path, enforce_eager=True, **kwargs) as eager:
        expected = _generate(eager, prompts, max_tokens=8)
    cc = {"cudagraph_mode": mode, "cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64]}
    with LLM(path, compilation_config=cc, **kwargs) as graphed:
        runner = graphed.llm_engine.runner
        got = _generate(graphed, prompts, max_tokens=8)
        assert runner.piecewise_graphs.replays > 0
        assert (runner.decode_graphs is not None) == (mode == "full_and_piecewise")
    for e, g in zip(expected, got):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
