"""The worker: start-up order, sleep / wake-up, collective_rpc and apply_model (CPU; GPU variants marked)."""

import threading

import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.runtime.worker import Worker

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": list(range(100 + 9 * i, 112 + 13 * i))} for i in range(4)]
SMALL = dict(dtype="float32", max_model_len=128, kv_cache_memory_bytes=2**24)
# piecewise compilation without Inductor (fast on CPU): the split graph, its pieces, the plan
COMPILED = {"mode": "piecewise", "backend": "eager", "use_cache": False}


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    with LLM(tiny_checkpoint("llama"), enforce_eager=True, **SMALL) as llm:
        yield llm


def test_start_up_order_allocates_the_kv_cache_after_compile_and_warm_up(tiny_checkpoint, monkeypatch):
    seen = {}
    real_warm_up, real_init = Worker._warm_up, Worker.initialize_kv_cache

    def warm_up(self):
        seen["kv_at_warm_up"] = list(self.kv_caches)
        seen["compiled_at_warm_up"] = self.compiled is not None and self.compiled.report.graphs_captured
        real_warm_up(self)

    def initialize(self, num_blocks, config=None):
        seen["phases_at_kv"] = list(self.phases)
        seen["compiled_at_kv"] = self.compiled.report.graphs_captured
        real_init(self, num_blocks, config)

    monkeypatch.setattr(Worker, "_warm_up", warm_up)
    monkeypatch.setattr(Worker, "initialize_kv_cache", initialize)
    with LLM(tiny_checkpoint("llama"), compilation_config=COMPILED, **SMALL) as llm:
        worker = llm.llm_engine.worker
        phases = list(worker.phases)
        assert worker.kv_caches and all(t.data_ptr() for t in worker.kv_caches)
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
        assert llm.compile_report().recompilations == 0  # warm-up ran the real (compiled) forward
    assert seen["kv_at_warm_up"] == [] and seen["compiled_at_warm_up"] == 1
    assert seen["phases_at_kv"] == ["load_model", "compile", "warm_up", "profile"]
    assert seen["compiled_at_kv"] == 1
    assert phases == ["load_model", "compile", "warm_up", "profile", "allocate_kv_cache"]  # no graphs on CPU


def test_compile_report_says_why_graphs_are_off(tiny_checkpoint):
    with LLM(tiny_checkpoint("llama"), compilation_config=COMPILED, **SMALL) as llm:
        report = llm.compile_report()
    assert report.attention_backend == "torch"
    assert report.cuda_graphs.startswith("off (") and "CUDA graphs" in report.summary()


def test_collective_rpc_and_apply_model(llm):
    worker = llm.llm_engine.worker
    assert llm.collective_rpc("kv_bytes_per_block") == [worker.kv_bytes_per_block()]
    got = llm.collective_rpc(lambda w, a, b=0: (type(w).__name__, a + b), args=(1,), kwargs={"b": 2})
    assert got == [("Worker", 3)]
    numel = sum(p.numel() for p in worker.model.parameters())
    assert llm.apply_model(lambda model: sum(p.numel() for p in model.parameters())) == [numel]
    assert llm.get_world_size() == 1 and llm.get_world_size(include_dp=False) == 1
    with pytest.raises(ValueError, match="no public method 'nope'"):
        llm.collective_rpc("nope")
    with pytest.raises(ValueError, match="timeout"):
        llm.collective_rpc("kv_bytes_per_block", timeout=0)
    with pytest.raises(ZeroDivisionError):
        llm.collective_rpc(lambda w: 1 / 0, timeout=30)
    release = threading.Event()
    with pytest.raises(TimeoutError):
        llm.collective_rpc(lambda w: release.wait(60), timeout=0.01)
    release.set()
    assert tokens(llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False))  # still serving


def _storage_bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_and_wake_up_keep_greedy_output(llm, level):
    before = tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    worker = llm.llm_engine.worker
    params = list(worker.model.parameters())
    ptrs = [id(p) for p in params]
    llm.sleep(level=level)
    assert _storage_bytes(params) == 0 and _storage_bytes(worker.kv_caches) == 0
    assert bool(worker._host_weights) == (level == 1)
    with pytest.raises(RuntimeError, match="asleep.*wake_up"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()  # the refused call left nothing behind
    llm.wake_up(tags=["weights"])
    assert _storage_bytes(params) > 0 and _storage_bytes(worker.kv_caches) == 0
    with pytest.raises(RuntimeError, match="kv_cache"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    llm.wake_up(tags=["kv_cache"])
    assert [id(p) for p in worker.model.parameters()] == ptrs and not worker._host_weights
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == before
    assert llm.llm_engine.kv.num_free_blocks == llm.llm_engine.num_blocks


def test_sleep_errors(llm):
    with pytest.raises(ValueError, match="level must be 1 or 2"):
        llm.sleep(level=3)
    with pytest.raises(ValueError, match="mode must be"):
        llm.sleep(mode="later")
    with pytest.raises(NotImplementedError, match="keep"):
        llm.sleep(mode="keep")
    engine = llm.llm_engine
    engine.add_request("pending", None, [5, 6, 7], GREEDY)
    llm.sleep(mode="abort")  # drops the unfinished request, frees its blocks
    assert not engine.has_unfinished_requests() and engine.kv.num_free_blocks == engine.num_blocks
    llm.wake_up()
    engine.add_request("pending", None, [5, 6, 7], GREEDY)
    llm.sleep(mode="wait")  # runs it to the end first
    assert not engine.has_unfinished_requests()
    llm.wake_up()
    with pytest.raises(ValueError, match="tags"):
        llm.wake_up(tags=["scheduling", "weights"])
    llm.wake_up()  # awake already: nothing to do
    llm.sleep()
    with pytest.raises(RuntimeError, match="already asleep"):
        llm.sleep()
    llm.wake_up()
    assert tokens(llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False))


def test_sleep_keeps_compiled_code_valid(tiny_checkpoint):
    with LLM(tiny_checkpoint("qwen3"), compilation_config=COMPILED, **SMALL) as llm:
        before = tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
        llm.sleep(1)
        llm.wake_up()
        assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == before
        report = llm.compile_report()
        assert report.graphs_captured == 1 and report.recompilations == 0


# ---------------------------------------------------------------------------------------- GPU


def _graph_llm(path, **kwargs):
    cc = {"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64]}
    return LLM(path, compilation_config=cc, dtype="float32", max_num_seqs=8, max_model_len=256, **kwargs)


@pytest.mark.gpu
def test_gpu_start_up_order_and_graph_memory(tiny_checkpoint):
    with _graph_llm(tiny_checkpoint("llama"), gpu_memory_utilization=0.95) as llm:
        worker = llm.llm_engine.worker
        assert worker.phases == [
            "load_model",
            "compile",
            "warm_up",
            "profile",
            "allocate_kv_cache",
            "capture_graphs",
        ]
        report = llm.compile_report()
        assert report.graph_memory_source in ("trial capture", "recorded")
        assert report.graph_memory_bytes > 0 and report.graph_capture_s > 0
        assert worker.graphs.captured("full") == [1, 2, 4, 8]
        assert worker.graphs.captured("piecewise") == [1, 2, 4, 8, 16, 32, 64]


@pytest.mark.gpu
@pytest.mark.parametrize("level", [1, 2])
def test_gpu_sleep_wake_identity_and_graphs_replay_after_wake(tiny_checkpoint, level):
    prompts = [{"prompt_token_ids": list(range(300 + 7 * i, 305 + 16 * i))} for i in range(6)]  # 5..85 tokens
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with _graph_llm(tiny_checkpoint("qwen3"), max_num_batched_tokens=64) as llm:
        worker = llm.llm_engine.worker
        before = tokens(llm.generate(prompts, params, use_tqdm=False))
        torch.cuda.synchronize()
        awake = torch.cuda.memory_allocated()
        released = _storage_bytes(worker.kv_caches) + _storage_bytes(worker.model.parameters())
        llm.sleep(level=level)
        assert torch.cuda.memory_allocated() <= awake - released  # weights, KV cache and graphs freed
        assert not worker.graphs.captured("full")
        with pytest.raises(RuntimeError, match="asleep"):
            llm.generate(prompts[:1], params, use_tqdm=False)
        llm.wake_up()
        assert worker.graphs.captured("full") == [1, 2, 4, 8]
        full, piecewise = worker.graphs.replays("full"), worker.graphs.replays("piecewise")
        after = tokens(llm.generate(prompts, params, use_tqdm=False))
        assert worker.graphs.replays("full") > full and worker.graphs.replays("piecewise") > piecewise
    assert after == before
