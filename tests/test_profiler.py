"""LLM(profiler_config=...), start_profile / stop_profile: a torch.profiler trace of the engine steps."""

import glob
import gzip
import json
import os

import pytest
import torch

from kiln import LLM, ProfilerConfig, SamplingParams

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [100 + i, 200, 300 + i]} for i in range(2)]


def make_llm(path, **profiler):
    return LLM(
        path, enforce_eager=True, dtype="float32", kv_cache_memory_bytes=2**24, profiler_config=profiler
    )


def load_trace(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    # errors="replace": torch's CPU profiler now and then records an event name that is not valid UTF-8
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return json.load(f)["traceEvents"]


def names(events) -> list[str]:
    return [e.get("name", "") for e in events]


def count_steps(llm) -> list[int]:
    """Counts the engine's steps into the returned list's single element."""
    engine, calls = llm.llm_engine, [0]
    step = engine.step

    def counted():
        calls[0] += 1
        return step()

    engine.step = counted
    return calls


def test_trace_has_ops_and_one_step_marker_per_step(tiny_checkpoint, tmp_path):
    with make_llm(
        tiny_checkpoint("llama"),
        profiler="torch",
        torch_profiler_dir=str(tmp_path),
        torch_profiler_use_gzip=False,
    ) as llm:
        steps = count_steps(llm)
        llm.start_profile("myrun")
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        llm.stop_profile()
        traces = glob.glob(str(tmp_path / "myrun_dp0_pp0_tp0.*.pt.trace.json"))
        assert len(traces) == 1 and llm.llm_engine.profiler.last_trace == traces[0]
        events = load_trace(traces[0])
        found = names(events)
        assert found.count("kiln::step") == steps[0] > 0
        assert "kiln::attention" in found  # kiln's attention op
        assert any(n in found for n in ("aten::mm", "aten::addmm", "aten::linear"))
        assert os.path.isfile(tmp_path / "profiler_out_0.txt")
        # steps after stop_profile are not profiled: no second trace
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        assert len(glob.glob(str(tmp_path / "*.json"))) == 1


def test_default_name_gzip_and_iteration_limits(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llama")
    with make_llm(
        path, profiler="torch", torch_profiler_dir=str(tmp_path), delay_iterations=1, max_iterations=2
    ) as llm:
        steps = count_steps(llm)
        llm.start_profile()
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        assert steps[0] > 3
        assert not llm.llm_engine.profiler.running  # max_iterations stopped it
        llm.stop_profile()
        (trace,) = glob.glob(str(tmp_path / "dp0_pp0_tp0.*.pt.trace.json.gz"))
        assert names(load_trace(trace)).count("kiln::step") == 2


def test_schedule_records_only_active_steps(tiny_checkpoint, tmp_path):
    with make_llm(
        tiny_checkpoint("llama"),
        profiler="torch",
        torch_profiler_dir=str(tmp_path),
        wait_iterations=1,
        warmup_iterations=1,
        active_iterations=2,
        torch_profiler_use_gzip=False,
    ) as llm:
        llm.start_profile("sched")
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        llm.stop_profile()
        (trace,) = glob.glob(str(tmp_path / "sched_*.json"))
        assert names(load_trace(trace)).count("kiln::step") == 2


def test_start_profile_without_config_says_how(tiny_checkpoint):
    with LLM(tiny_checkpoint("llama"), enforce_eager=True, dtype="float32") as llm:
        with pytest.raises(RuntimeError, match="profiler_config=.*'profiler': 'torch'.*torch_profiler_dir"):
            llm.start_profile()
        llm.stop_profile()  # not started: nothing to stop, as in vLLM
        assert len(llm.generate(PROMPTS, PARAMS, use_tqdm=False)) == 2


@pytest.mark.parametrize(
    "config, message",
    [
        ({"profiler": "torch", "torch_profiler_dir": "/tmp/x", "bogus": 1}, "unknown key 'bogus'"),
        ({"profiler": "nvprof"}, "profiler:.*'nvprof'"),
        ({"profiler": "torch"}, "torch_profiler_dir must be set"),
        ({"torch_profiler_dir": "/tmp/x"}, "only applicable when profiler is set to 'torch'"),
        ({"profiler": "torch", "torch_profiler_dir": "/tmp/x", "delay_iterations": -1}, "delay_iterations"),
        ({"profiler": "torch", "torch_profiler_dir": "/tmp/x", "active_iterations": 0}, "active_iterations"),
        ({"profiler": "torch", "torch_profiler_dir": "/tmp/x", "capture_torch_profiler": True}, "only False"),
        ("torch", "must be a dict or a ProfilerConfig"),
    ],
)
def test_bad_profiler_config_is_rejected(tiny_checkpoint, config, message):
    with pytest.raises(ValueError, match=message):
        LLM(tiny_checkpoint("llama"), enforce_eager=True, profiler_config=config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_profiler_needs_cuda(tiny_checkpoint):
    with pytest.raises(ValueError, match="'cuda' needs a CUDA device"):
        LLM(tiny_checkpoint("llama"), profiler_config={"profiler": "cuda"})


def test_config_object_and_dir_made_absolute(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ProfilerConfig(profiler="torch", torch_profiler_dir="traces")
    assert config.torch_profiler_dir == str(tmp_path / "traces")
    assert ProfilerConfig.parse(config) == config and ProfilerConfig.parse(None).profiler is None
    with LLM(tiny_checkpoint("llama"), enforce_eager=True, profiler_config=config) as llm:
        assert llm.llm_engine.profiler.config == config


def test_bad_prefix(tiny_checkpoint, tmp_path):
    with make_llm(tiny_checkpoint("llama"), profiler="torch", torch_profiler_dir=str(tmp_path)) as llm:
        with pytest.raises(ValueError, match="profile_prefix"):
            llm.start_profile("a/b")
        assert not llm.llm_engine.profiler.active


@pytest.mark.gpu
def test_gpu_trace_has_cuda_kernels(tiny_checkpoint, tmp_path):
    with make_llm(
        tiny_checkpoint("llama"),
        profiler="torch",
        torch_profiler_dir=str(tmp_path),
        torch_profiler_use_gzip=False,
    ) as llm:
        llm.start_profile("gpu")
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        llm.stop_profile()
        (trace,) = glob.glob(str(tmp_path / "gpu_*.json"))
        events = load_trace(trace)
        assert "kiln::step" in names(events)
        assert any(e.get("cat") == "kernel" for e in events)  # device kernels, not only host ops


@pytest.mark.gpu
def test_gpu_cuda_profiler_runs(tiny_checkpoint):
    with make_llm(tiny_checkpoint("llama"), profiler="cuda", max_iterations=2) as llm:
        llm.start_profile()
        assert llm.llm_engine.profiler.running
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        assert not llm.llm_engine.profiler.running
        llm.stop_profile()
