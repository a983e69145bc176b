"""The compile cache is always right.

- Its key holds every setting that changes generated code and none that does not (both lists below,
  through the same function the engine keys on).
- A miss names what changed, in one line, in the log and in ``compile_report()``.
- A warm start in a fresh process compiles nothing (Inductor's code generation and C++ builds are
  made to raise there) and gives the same greedy tokens as eager.
- ``cache="require"`` turns a miss into ``CompileCacheMissError``; ``kiln compile`` fills the cache.
- Two processes starting at once on an empty cache directory both succeed and leave one valid entry.
"""

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kiln import LLM, CompilationConfig, SamplingParams
from kiln.compiler.cache import CompileCache, CompileCacheMissError, cache_key
from kiln.compiler.cache_diff import miss_reason
from kiln.compiler.compiled_forward import engine_cache_details
from kiln.compiler.config import InvalidCompilationConfig
from kiln.models.loader import build_model
from kiln.runtime.engine_args import EngineArgs

ENGINE = dict(dtype="float32", max_num_seqs=8, max_model_len=256, kv_cache_memory_bytes=16 * 2**20)
PROMPTS = [[5, 17, 301, 42, 9], [77, 1000, 3, 3, 3, 3, 250], [12]]


# ---------------------------------------------------------------------------------------------- the key


def _details(path: str, **kwargs) -> dict:
    cc = {"mode": "piecewise", **kwargs.pop("compilation_config", {})}
    resolved = EngineArgs(model=path, compilation_config=cc, **{**ENGINE, **kwargs}).resolve()
    cfg = resolved.engine_config
    model = build_model(
        cfg.model_path,
        resolved.model_config,
        cfg.dtype,
        cfg.device,
        "dummy",
        pooling=cfg.pooling,
        quant=cfg.quantization,
    )
    return engine_cache_details(cfg, resolved.model_config, model)


# settings that change no generated code: the same key
SAME_CODE = {
    "kv_cache_memory_bytes": {"kv_cache_memory_bytes": 64 * 2**20},
    "gpu_memory_utilization": {"gpu_memory_utilization": 0.5},
    "seed": {"seed": 1234},
    "max_num_seqs": {"max_num_seqs": 3},
    "max_model_len": {"max_model_len": 128},
    "max_num_batched_tokens above the trace": {"max_num_batched_tokens": 4096},
    "block_size": {"block_size": 32},
    "enable_prefix_caching": {"enable_prefix_caching": False},
    "max_logprobs": {"max_logprobs": 5},
    "scheduling_policy": {"scheduling_policy": "priority"},
    "kv_cache_dtype (attention is opaque to the graph)": {"kv_cache_dtype": "fp8"},
    "cudagraph_capture_sizes": {"compilation_config": {"cudagraph_capture_sizes": [1, 2, 4]}},
    "cudagraph_mode": {"compilation_config": {"cudagraph_mode": "piecewise"}},
    "cache_dir": {"compilation_config": {"cache_dir": "/elsewhere"}},
    "debug_dump_path": {"compilation_config": {"debug_dump_path": "/tmp/dump"}},
    "cache": {"compilation_config": {"cache": "require"}},
    "data_parallel_size (replicas of one engine)": {"data_parallel_size": 2},
}

# settings that change generated code: another key
OTHER_CODE = {
    "compile_sizes": {"compilation_config": {"compile_sizes": [1]}},
    "mode": {"compilation_config": {"mode": "inductor"}},
    "backend": {"compilation_config": {"backend": "eager"}},
    "splitting_ops": {"compilation_config": {"splitting_ops": ["kiln::attention", "aten::mm"]}},
    "tune_static_compiles": {"compilation_config": {"tune_static_compiles": False}},
    "reuse_dynamo_graph (the entry holds the saved graph)": {
        "compilation_config": {"reuse_dynamo_graph": True}
    },
    "pass_config.eliminate_noops": {"compilation_config": {"pass_config": {"eliminate_noops": False}}},
    "pass_config.fuse_add_rms_norm": {"compilation_config": {"pass_config": {"fuse_add_rms_norm": True}}},
    "pass_config.fuse_gemv": {"compilation_config": {"pass_config": {"fuse_gemv": True}}},
    "pass_config.fuse_fp8_gemv": {"compilation_config": {"pass_config": {"fuse_fp8_gemv": True}}},
    "inductor_compile_config": {"compilation_config": {"inductor_compile_config": {"max_autotune": True}}},
    "dtype": {"dtype": "bfloat16"},
    "quantization": {"quantization": "fp8"},
    "enable_lora": {"enable_lora": True},
    "max_lora_rank": {"enable_lora": True, "max_lora_rank": 64},
    "hf_overrides": {"hf_overrides": {"rms_norm_eps": 1e-3}},
    "max_num_batched_tokens below the trace": {"max_num_batched_tokens": 64},
    "tensor_parallel_size": {"tensor_parallel_size": 2},
}


@pytest.fixture(scope="module")
def base_key(tiny_checkpoint):
    return cache_key(_details(tiny_checkpoint("llama")))


def _skip_without_the_devices(settings: dict) -> None:
    """On a CUDA machine the engine checks ranks x replicas against its devices before keying."""
    ranks = settings.get("tensor_parallel_size", 1) * settings.get("data_parallel_size", 1)
    if torch.cuda.is_available() and ranks > torch.cuda.device_count():
        pytest.skip(f"{ranks} engine processes need {ranks} CUDA devices here")


@pytest.mark.parametrize("name", list(SAME_CODE))
def test_settings_that_change_no_code_keep_the_key(name, tiny_checkpoint, base_key):
    _skip_without_the_devices(SAME_CODE[name])
    assert cache_key(_details(tiny_checkpoint("llama"), **SAME_CODE[name])) == base_key


@pytest.mark.parametrize("name", list(OTHER_CODE))
def test_settings_that_change_code_change_the_key(name, tiny_checkpoint, base_key):
    _skip_without_the_devices(OTHER_CODE[name])
    assert cache_key(_details(tiny_checkpoint("llama"), **OTHER_CODE[name])) != base_key


def test_model_architecture_and_class_enter_the_key(tiny_checkpoint, base_key):
    assert cache_key(_details(tiny_checkpoint("qwen3"))) != base_key
    pooling = _details(tiny_checkpoint("llama"), runner="pooling", convert="embed")
    assert pooling["model_class"].endswith("LlamaForPooling") and cache_key(pooling) != base_key


def test_require_needs_the_cache():
    with pytest.raises(InvalidCompilationConfig, match="use_cache"):
        CompilationConfig.parse({"cache": "require", "use_cache": False})
    with pytest.raises(InvalidCompilationConfig, match="cache"):
        CompilationConfig.parse({"cache": "sometimes"})


# ---------------------------------------------------------------------------------------------- miss reasons


def test_miss_reason_names_the_changed_setting(tmp_path):
    root = str(tmp_path)
    assert miss_reason(root, {"a": 1}) == "miss: the cache is empty"
    old = {"compilation_config": {"compile_sizes": [1], "mode": 3}, "dtype": "torch.float32"}
    CompileCache(root, old).save_manifest({"report": {}})
    new = {"compilation_config": {"compile_sizes": [], "mode": 3}, "dtype": "torch.float32"}
    assert CompileCache(root, new).lookup() == (False, "miss: compile_sizes changed [1] -> []")
    assert CompileCache(root, old).lookup() == (True, f"hit: entry {cache_key(old)}")
    # the closest entry explains the miss; nested settings are named by their path, a value missing
    # (or None) on one side reads "unset"
    CompileCache(root, {**old, "dtype": "torch.bfloat16", "lora": None}).save_manifest({})
    both = {**new, "dtype": "torch.bfloat16", "lora": {"max_lora_rank": 16}}
    assert CompileCache(root, both).lookup()[1] == (
        "miss: compile_sizes changed [1] -> []; lora.max_lora_rank changed unset -> 16"
    )
    assert CompileCache(root, old, enabled=False).lookup() == (False, "disabled (use_cache=False)")


def test_measurements_survive_concurrent_writers(tmp_path):
    """Read-modify-write of measurements.json under its lock: no writer's value is lost."""
    script = textwrap.dedent(
        """
        import sys
        from kiln.compiler.cache import CompileCache
        cache = CompileCache(sys.argv[1], {"a": 1})
        for i in range(40):
            cache.record_measurement(f"{sys.argv[2]}_{i}", i)
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), f"w{n}"]) for n in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    cache = CompileCache(str(tmp_path), {"a": 1})
    assert all(cache.measurement(f"w{n}_{i}") == i for n in range(3) for i in range(40))


# ---------------------------------------------------------------------------------------------- processes

_START = """
import json, sys
import torch
from torch._dynamo.utils import counters

path, cfg, engine, prompts, forbid = sys.argv[1:6]
if forbid == "1":  # a warm start must not generate or build any code
    import torch._inductor.cpp_builder as cpp_builder
    import torch._inductor.graph as graph

    def refuse(*args, **kwargs):
        raise AssertionError("compiled during a warm start")

    build = cpp_builder.CppBuilder.build

    def build_unless_compiling(self, *args, **kwargs):
        if not self._preprocessing:  # Inductor preprocesses its header to check its cached copy
            refuse()
        return build(self, *args, **kwargs)

    graph.GraphLowering.compile_to_module = refuse
    graph.GraphLowering.codegen = refuse
    cpp_builder.CppBuilder.build = build_unless_compiling
if "no-trace" in sys.argv[6:]:  # nor trace the forward with Dynamo
    import torch._dynamo.convert_frame as convert_frame
    import torch._dynamo.symbolic_convert as symbolic_convert

    def no_trace(*args, **kwargs):
        raise AssertionError("Dynamo traced during a warm start")

    convert_frame.fullgraph_capture = no_trace
    symbolic_convert.InstructionTranslator.run = no_trace

from kiln import LLM, SamplingParams

llm = LLM(path, compilation_config=json.loads(cfg), **json.loads(engine))
params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
out = llm.generate([{"prompt_token_ids": p} for p in json.loads(prompts)], params, use_tqdm=False)
result = {
    "report": llm.compile_report().to_dict(),
    "tokens": [o.outputs[0].token_ids for o in out],
    "counters": {k: dict(v) for k, v in counters.items()},
    "num_blocks": llm.llm_engine.num_blocks,
}
print("RESULT" + json.dumps(result))
"""


def _start(path, cfg, engine=ENGINE, forbid=False, *extra) -> subprocess.Popen:
    args = [path, json.dumps(cfg), json.dumps(engine), json.dumps(PROMPTS), "1" if forbid else "0", *extra]
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_START), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.split("RESULT", 1)[1])


def _kiln_compile(path, cfg, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kiln.cli", "compile", path, "--config", json.dumps(cfg), *extra]
    cmd += ["--engine-args", json.dumps(ENGINE)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def eager_tokens(tiny_checkpoint):
    with LLM(tiny_checkpoint("llama"), enforce_eager=True, **ENGINE) as llm:
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in out]


@pytest.fixture(scope="module")
def filled(tiny_checkpoint, tmp_path_factory):
    """An empty cache directory filled by two processes started at once: ``kiln compile`` and an LLM
    that generates. Returns (config, the LLM process's result, kiln compile's stdout)."""
    root = str(tmp_path_factory.mktemp("shared_cache"))
    cfg = {"mode": "piecewise", "cache_dir": root}
    fill = _kiln_compile(tiny_checkpoint("llama"), cfg)
    start = _start(tiny_checkpoint("llama"), cfg)
    out, err = fill.communicate(timeout=400)
    assert fill.returncode == 0, err[-3000:]
    return cfg, _result(start), json.loads(out.strip().splitlines()[-1])


def test_two_processes_at_once_both_succeed_and_leave_one_valid_entry(filled, eager_tokens):
    cfg, started, compiled = filled
    assert started["tokens"] == eager_tokens
    assert compiled["cache_key"] == started["report"]["cache_key"]
    # one compiled, the other waited for it and loaded its work
    statuses = sorted([compiled["cache_status"], started["report"]["cache_status"]])
    assert statuses == ["hit", "miss"], statuses
    entries = [e for e in os.listdir(cfg["cache_dir"]) if not e.startswith(".")]
    assert entries == [compiled["cache_key"]]
    with open(os.path.join(cfg["cache_dir"], entries[0], "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["key"] == entries[0] and manifest["details"]["compilation_config"]["mode"] == 3


def test_warm_start_compiles_nothing_with_other_memory_settings(filled, tiny_checkpoint, eager_tokens):
    cfg, _, _ = filled
    engine = dict(
        ENGINE, kv_cache_memory_bytes=32 * 2**20, seed=7, max_num_seqs=4, gpu_memory_utilization=0.5
    )
    warm = _result(_start(tiny_checkpoint("llama"), cfg, engine, forbid=True))
    report, counters = warm["report"], warm["counters"]
    assert report["cache_status"] == "hit" and report["cache_reason"].startswith("hit: entry ")
    assert report["cache_misses"] == 0 and report["inductor_s"] == 0 and report["cache_hits"] == 3
    assert counters["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert counters["aot_autograd"].get("autograd_cache_miss", 0) == 0
    assert counters["stats"]["unique_graphs"] == 1 and report["recompilations"] == 0
    assert warm["tokens"] == eager_tokens
    phases = report["timeline"]["phases_s"]  # the timeline shows the load, not a compile
    assert phases["inductor"] == 0 and phases["cache_load"] > 0 and phases["dynamo"] > 0


def test_kiln_compile_check(filled, tiny_checkpoint):
    cfg, _, compiled = filled
    ok = _kiln_compile(tiny_checkpoint("llama"), cfg, "--check")
    out, err = ok.communicate(timeout=400)
    assert ok.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["cache_status"] == "hit"
    missing = _kiln_compile(tiny_checkpoint("llama"), {**cfg, "compile_sizes": [4]}, "--check")
    out, err = missing.communicate(timeout=400)
    assert missing.returncode == 1
    assert "miss: compile_sizes changed [] -> [4]" in err


def test_require_turns_a_miss_into_an_error(filled, tiny_checkpoint):
    cfg, _, _ = filled
    strict = {**cfg, "cache": "require", "pass_config": {"fuse_add_rms_norm": True}}
    with pytest.raises(
        CompileCacheMissError, match=r"miss: pass_config.fuse_add_rms_norm changed false -> true"
    ):
        LLM(tiny_checkpoint("llama"), compilation_config=strict, **ENGINE)
    # a complete entry starts under the strict mode (nothing compiled, so no error)
    with LLM(tiny_checkpoint("llama"), compilation_config={**cfg, "cache": "require"}, **ENGINE) as llm:
        assert llm.compile_report().cache_status == "hit"


def test_changed_setting_misses_with_reason_in_log_and_report(filled, tiny_checkpoint, eager_tokens, caplog):
    cfg, _, _ = filled
    with caplog.at_level(logging.INFO, logger="kiln"):
        llm = LLM(tiny_checkpoint("llama"), compilation_config={**cfg, "compile_sizes": [3]}, **ENGINE)
    with llm:
        report = llm.compile_report()
        assert report.cache_status == "miss"
        assert report.cache_reason == "miss: compile_sizes changed [] -> [3]"
        assert "miss: compile_sizes changed [] -> [3]" in report.summary()
        assert report.timeline["phases_s"]["inductor"] > 0
        lines = [r.getMessage() for r in caplog.records if "miss: compile_sizes changed" in r.getMessage()]
        assert any(line.startswith("kiln compile cache: miss:") for line in lines)
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in out] == eager_tokens


def test_engine_keys_on_engine_cache_details(filled, tiny_checkpoint):
    """The engine's cache entry is the one ``engine_cache_details`` names (the function the key tests use)."""
    cfg, _, _ = filled
    with LLM(tiny_checkpoint("llama"), compilation_config=cfg, **ENGINE) as llm:
        worker = llm.llm_engine.worker
        details = engine_cache_details(llm.config, worker.model_config, worker.model)
        assert worker.compiled.cache.details == details
        assert llm.compile_report().cache_key == cache_key(details)


@pytest.fixture(scope="module")
def saved_graph(tiny_checkpoint, tmp_path_factory):
    """A cache filled by a cold start that keeps Dynamo's graph (reuse_dynamo_graph)."""
    cfg = {
        "mode": "piecewise",
        "cache_dir": str(tmp_path_factory.mktemp("graph_cache")),
        "reuse_dynamo_graph": True,
    }
    return cfg, _result(_start(tiny_checkpoint("llama"), cfg))


def test_saved_dynamo_graph_warm_start_neither_traces_nor_compiles(
    saved_graph, tiny_checkpoint, eager_tokens
):
    cfg, cold = saved_graph
    assert cold["report"]["dynamo_graph"] == "traced and saved" and cold["tokens"] == eager_tokens
    assert os.path.isfile(os.path.join(cold["report"]["cache_dir"], "dynamo_forward.bin"))
    warm = _result(_start(tiny_checkpoint("llama"), cfg, dict(ENGINE, seed=5), True, "no-trace"))
    report = warm["report"]
    assert report["dynamo_graph"] == "loaded" and report["cache_status"] == "hit"
    assert warm["counters"].get("stats", {}).get("unique_graphs", 0) == 0
    assert report["dynamo_s"] == 0 and report["graphs_captured"] == 1 and report["cache_hits"] == 3
    assert warm["tokens"] == eager_tokens


def test_saved_dynamo_graph_that_does_not_load_is_traced_again(saved_graph, tiny_checkpoint, eager_tokens):
    cfg, cold = saved_graph
    path = os.path.join(cold["report"]["cache_dir"], "dynamo_forward.bin")
    with open(path, "rb") as f:
        good = f.read()
    try:
        with open(path, "wb") as f:
            f.write(good[: len(good) // 2])  # damaged
        with LLM(tiny_checkpoint("llama"), compilation_config=cfg, **ENGINE) as llm:
            report = llm.compile_report()
            assert report.dynamo_graph.startswith("traced (loading the saved graph failed")
            assert report.cache_status == "hit"  # the pieces still load from Inductor's cache
            params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
            out = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
            assert [o.outputs[0].token_ids for o in out] == eager_tokens
    finally:
        with open(path, "wb") as f:
            f.write(good)


def test_reuse_dynamo_graph_without_torch_support_traces(saved_graph, tiny_checkpoint, monkeypatch):
    import kiln.compiler.dynamo_graph as dynamo_graph

    cfg, _ = saved_graph
    monkeypatch.setattr(dynamo_graph, "supported", lambda: False)
    with LLM(tiny_checkpoint("llama"), compilation_config=cfg, **ENGINE) as llm:
        assert llm.compile_report().dynamo_graph == "traced (this torch cannot save Dynamo graphs)"
    with pytest.raises(InvalidCompilationConfig, match="reuse_dynamo_graph"):
        CompilationConfig.parse({"reuse_dynamo_graph": True, "use_cache": False})


def test_reuse_dynamo_graph_where_torch_has_aot_compile_off_by_default(
    tiny_checkpoint, eager_tokens, tmp_path
):
    """torch 2.11 ships ``enable_aot_compile=False``; kiln switches it on for its own capture and load."""
    import torch._dynamo.config as dynamo_config

    if "enable_aot_compile" not in dynamo_config._config:
        pytest.skip("this torch has no enable_aot_compile setting")
    cfg = {"mode": "piecewise", "cache_dir": str(tmp_path), "reuse_dynamo_graph": True}
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    # torch's own patch (monkeypatch's undo would hide the setting from later tests)
    with dynamo_config.patch(enable_aot_compile=False):
        for expected in ("traced and saved", "loaded"):
            torch._dynamo.reset()
            with LLM(tiny_checkpoint("llama"), compilation_config=cfg, **ENGINE) as llm:
                assert llm.compile_report().dynamo_graph == expected
                out = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
                assert [o.outputs[0].token_ids for o in out] == eager_tokens
        assert dynamo_config.enable_aot_compile is False  # left as it was


@pytest.mark.gpu
def test_warm_start_on_gpu_compiles_nothing_and_reuses_the_kv_profile(tiny_checkpoint, tmp_path):
    cfg = {"mode": "piecewise", "cache_dir": str(tmp_path)}
    engine = dict(dtype="float32", max_num_seqs=8, max_model_len=256, gpu_memory_utilization=0.3)
    cold = _result(_start(tiny_checkpoint("llama"), cfg, engine))
    warm = _result(_start(tiny_checkpoint("llama"), cfg, dict(engine, seed=3), forbid=True))
    assert cold["report"]["cache_status"] == "miss" and warm["report"]["cache_status"] == "hit"
    assert warm["tokens"] == cold["tokens"]
    assert cold["report"]["kv_profile_source"] == "measured"
    assert warm["report"]["kv_profile_source"] == "recorded"
    assert warm["report"]["graph_memory_source"] == "recorded"
    # the same figures give the same KV cache, up to what other processes took meanwhile
    assert abs(warm["num_blocks"] - cold["num_blocks"]) <= 0.02 * cold["num_blocks"]


@pytest.mark.gpu
def test_saved_dynamo_graph_on_gpu(tiny_checkpoint, tmp_path):
    cfg = {"mode": "piecewise", "cache_dir": str(tmp_path), "reuse_dynamo_graph": True}
    engine = dict(dtype="float32", max_num_seqs=8, max_model_len=256, gpu_memory_utilization=0.3)
    cold = _result(_start(tiny_checkpoint("llama"), cfg, engine))
    warm = _result(_start(tiny_checkpoint("llama"), cfg, engine, True, "no-trace"))
    assert cold["report"]["dynamo_graph"] == "traced and saved"
    assert warm["report"]["dynamo_graph"] == "loaded" and warm["report"]["cache_status"] == "hit"
    assert warm["tokens"] == cold["tokens"]
