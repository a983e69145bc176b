"""CUDA graphs replay exactly what eager execution computes (the graph tests need a GPU)."""

import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.compiler.cudagraph import default_capture_sizes


def test_default_capture_sizes_ladder():
    assert default_capture_sizes(256)[:5] == [1, 2, 4, 8, 16]
    assert default_capture_sizes(256)[-1] == 256
    assert default_capture_sizes(512)[-3:] == [448, 480, 512]
    assert default_capture_sizes(1024)[-3:] == [896, 960, 1024]
    assert default_capture_sizes(700)[-3:] == [576, 640, 700]  # the largest batch always has a graph
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
        assert graphed.llm_engine.worker.graphs.captured("full") == [1, 2, 4, 8]
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
        graphs = graphed.llm_engine.worker.graphs
        got = _generate(graphed, prompts, max_tokens=8)
        assert graphs.replays("piecewise") > 0
        assert bool(graphs.captured("full")) == (mode == "full_and_piecewise")
        assert graphs.replays("full") > 0 if mode == "full_and_piecewise" else graphs.replays("full") == 0
    for e, g in zip(expected, got):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids


@pytest.mark.gpu
def test_capture_at_high_memory_utilization_never_runs_out_of_memory(tiny_checkpoint, tmp_path):
    """gpu_memory_utilization=0.95 with every default capture size: the KV cache takes what the
    measured forward peak and graph memory leave, and capture fits. The second start reuses the graph
    memory recorded by the first instead of a trial capture."""
    path = tiny_checkpoint("llama")
    cc = {"cache_dir": str(tmp_path)}
    sources = []
    for _ in range(2):
        with LLM(path, compilation_config=cc, gpu_memory_utilization=0.95, dtype="float16") as llm:
            worker = llm.llm_engine.worker
            assert worker.graphs.captured("full") == worker.graphs.full_sizes
            assert worker.graphs.captured("piecewise") == worker.graphs.piecewise_sizes
            free, total = torch.cuda.mem_get_info()
            assert total - free <= 0.95 * total + 2**28  # within the budget (context rounding aside)
            out = _generate(llm, [list(range(5, 40)), list(range(50, 60))], max_tokens=16)
            assert all(len(o.outputs[0].token_ids) == 16 for o in out)
            sources.append(llm.compile_report().graph_memory_source)
    assert sources == ["trial capture", "recorded"]


def test_graphs_are_off_with_the_torch_backend_and_the_report_says_so():
    from kiln.compiler.config import CompilationConfig

    plan = CompilationConfig().resolve("cuda", False, False, 8, 64, "torch")
    assert not plan.full_graph_sizes and not plan.piecewise_graph_sizes
    assert "torch attention backend does not support CUDA graphs" in plan.describe_graphs()
    plan = CompilationConfig().resolve("cuda", False, True, 8, 64, "triton")
    assert plan.full_graph_sizes == (1, 2, 4, 8) and plan.piecewise_graph_sizes == (1, 2, 4, 8)
    assert plan.describe_graphs() == "full x4 (1..8) + piecewise x4 (1..8)"
    plan = CompilationConfig(cudagraph_mode="piecewise", compile_sizes=[1]).resolve("cuda", False, True, 8, 4)
    assert (
        not plan.full_graph_sizes and plan.piecewise_graph_sizes == (1, 2, 4) and plan.compile_sizes == (1,)
    )
    plan = CompilationConfig(mode=2, pass_config={"fuse_gemv": True}).resolve("cuda", False, True, 8, 64)
    assert plan.full_graph_sizes and not plan.piecewise_graph_sizes and plan.one_row_logits
    assert CompilationConfig().resolve("cuda", True, True, 8, 64).graphs_off_reason == "enforce_eager=True"
    assert CompilationConfig().resolve("cpu", False, False, 8, 64).mode.label == "none"
