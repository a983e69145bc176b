"""The compiler end to end on the tiny checkpoints (CPU: Inductor's C++ backend; GPU: Triton).

Compiled and eager generation agree token for token, one Dynamo trace serves every batch size,
a second construction in a fresh process loads everything from the compile cache, and bad
configs are rejected before anything is built.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.utils import counters

from kiln import LLM, CompilationConfig, SamplingParams
from kiln.compiler.cache import CompileCache, cache_key, cache_key_details
from kiln.compiler.config import CompilationMode, InvalidCompilationConfig
from kiln.compiler.piecewise import CompiledPiece
from kiln.models.config import ModelConfig
from kiln.models.loader import read_config

# a small KV cache: on a GPU several of these engines live side by side in one process
ENGINE = dict(
    dtype="float32",
    max_num_seqs=8,
    max_model_len=256,
    max_num_batched_tokens=256,
    kv_cache_memory_bytes=64 * 2**20,
)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("kiln_cache"))


def _prompts(seed: int, n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(5, 40000, (int(torch.randint(2, 40, (1,), generator=gen)),), generator=gen).tolist()
        for _ in range(n)
    ]


def _generate(llm, prompts, max_tokens=8):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def _pieces(split_module) -> list[CompiledPiece]:
    """The compiled pieces of a split module (unwrapped where CUDA graphs wrap them)."""
    modules = [getattr(m, "runnable", m) for m in split_module.children()]
    return [m for m in modules if isinstance(m, CompiledPiece)]


def _assert_same(expected, got, tol=1e-3):
    for e, g in zip(expected, got):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        for step_e, step_g, t in zip(e.outputs[0].logprobs, g.outputs[0].logprobs, e.outputs[0].token_ids):
            assert abs(step_e[t].logprob - step_g[t].logprob) < tol


# batches: single prompt, a full batch of 8 (decode steps of exactly 8 tokens), ragged mixes
BATCHES = [(0, 1), (1, 8), (2, 3), (3, 5)]


@pytest.fixture(scope="module")
def eager_outputs(tiny_checkpoint):
    out = {}
    for arch in ("llama", "qwen3"):
        with LLM(tiny_checkpoint(arch), enforce_eager=True, **ENGINE) as llm:
            out[arch] = [_generate(llm, _prompts(seed, n)) for seed, n in BATCHES]
    return out


def _compiled_config(arch: str, cache_root: str, tmp_path_factory) -> dict:
    cfg = {"mode": "piecewise", "cache_dir": cache_root}
    if arch == "qwen3":  # static compiles and debug dumps ride along on the second model
        cfg["compile_sizes"] = [8]
        cfg["debug_dump_path"] = str(tmp_path_factory.mktemp("dump"))
    return cfg


@pytest.fixture(scope="module")
def compiled(tiny_checkpoint, cache_root, tmp_path_factory):
    """arch -> (LLM, compilation config dict); built once per module."""
    made = {}

    def get(arch):
        if arch not in made:
            cfg = _compiled_config(arch, cache_root, tmp_path_factory)
            made[arch] = (LLM(tiny_checkpoint(arch), compilation_config=cfg, **ENGINE), cfg)
        return made[arch]

    yield get
    for llm, _ in made.values():
        llm.shutdown()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_compiled_matches_eager(arch, compiled, eager_outputs):
    llm, cfg = compiled(arch)
    got = [_generate(llm, _prompts(seed, n)) for seed, n in BATCHES]
    for expected, batch in zip(eager_outputs[arch], got):
        _assert_same(expected, batch)
    report = llm.compile_report()
    assert report.mode == "piecewise" and report.graphs_captured == 1 and report.recompilations == 0
    # 2 layers: 3 pieces around 2 attention ops; first, middle and last piece all differ
    assert (report.pieces, report.splitting_pieces, report.unique_compiles) == (3, 2, 3)
    assert report.cache_status == "miss" and report.cache_misses > 0
    assert report.noops_removed > 0
    assert report.dynamo_s > 0 and report.inductor_s > 0 and report.total_s > 0
    assert "compiled (piecewise/inductor)" in report.summary()


def test_compile_sizes_get_static_compiles(compiled):
    llm, cfg = compiled("qwen3")
    report = llm.compile_report()
    assert report.compile_sizes == [8] and report.static_compiles == 3
    pieces = _pieces(llm.llm_engine.worker.compiled.split_module)
    assert len(pieces) == 3 and all(set(p.static) == {8} for p in pieces)


def test_debug_dump_writes_graphs_and_inductor_code(compiled):
    llm, cfg = compiled("qwen3")
    files = os.listdir(cfg["debug_dump_path"])
    for part in ("dynamo_graph", "after_noop_elimination", "after_split", "submod_0_", "inductor_output"):
        assert any(part in f for f in files), (part, files)


def test_no_recompilation_across_batch_sizes(compiled):
    llm, _ = compiled("llama")
    forward = llm.llm_engine.worker.compiled
    graphs_before = counters["stats"]["unique_graphs"]
    for n in list(range(1, 34)) + [57, 100, 129, 255, 256]:
        forward._dummy_run(n)
    _generate(llm, _prompts(7, 6), max_tokens=4)
    assert counters["stats"]["unique_graphs"] == graphs_before
    assert llm.compile_report().graphs_captured == 1 and llm.compile_report().recompilations == 0


_WARM = """
import json, sys
from kiln import LLM, SamplingParams
path, cfg, engine = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
llm = LLM(path, compilation_config=cfg, **engine)
params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
out = llm.generate([{"prompt_token_ids": p} for p in json.loads(sys.argv[4])], params, use_tqdm=False)
tokens = [o.outputs[0].token_ids for o in out]
print("RESULT" + json.dumps({"report": llm.compile_report().to_dict(), "tokens": tokens}))
"""


def test_warm_start_in_fresh_process_hits_cache(compiled, tiny_checkpoint, eager_outputs):
    llm, cfg = compiled("llama")
    cold = llm.compile_report()
    prompts = _prompts(*BATCHES[2])
    engine = {k: v for k, v in ENGINE.items()}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(_WARM),
            tiny_checkpoint("llama"),
            json.dumps(cfg),
            json.dumps(engine),
            json.dumps(prompts),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    warm = result["report"]
    assert warm["cache_key"] == cold.cache_key
    assert warm["cache_status"] == "hit" and warm["cache_misses"] == 0 and warm["cache_hits"] == 3
    assert warm["inductor_s"] == 0 and warm["cache_load_s"] > 0
    assert result["tokens"] == [o.outputs[0].token_ids for o in eager_outputs["llama"][2]]


def test_cache_key_changes_with_each_input(tiny_checkpoint, monkeypatch):
    model_config = ModelConfig.from_dict(read_config(tiny_checkpoint("llama")))
    cpu, cfg = torch.device("cpu"), CompilationConfig(mode=3)
    base = cache_key(cache_key_details(model_config, torch.float32, cpu, cfg))
    assert base == cache_key(cache_key_details(model_config, torch.float32, cpu, CompilationConfig(mode=3)))
    # where things are written is not part of the key
    assert base == cache_key(
        cache_key_details(
            model_config,
            torch.float32,
            cpu,
            cfg.model_copy(update={"cache_dir": "/elsewhere", "debug_dump_path": "/tmp/x"}),
        )
    )

    other_model = ModelConfig.from_dict({**read_config(tiny_checkpoint("llama")), "rms_norm_eps": 1e-5})
    changed = {
        "model config": cache_key(cache_key_details(other_model, torch.float32, cpu, cfg)),
        "dtype": cache_key(cache_key_details(model_config, torch.bfloat16, cpu, cfg)),
        "compilation config": cache_key(
            cache_key_details(model_config, torch.float32, cpu, CompilationConfig(mode=3, compile_sizes=[4]))
        ),
        "pass toggle": cache_key(
            cache_key_details(
                model_config,
                torch.float32,
                cpu,
                CompilationConfig(mode=3, pass_config={"eliminate_noops": False}),
            )
        ),
    }
    import kiln

    monkeypatch.setattr(kiln, "__version__", "99.0")
    changed["kiln version"] = cache_key(cache_key_details(model_config, torch.float32, cpu, cfg))
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    changed["torch version"] = cache_key(cache_key_details(model_config, torch.float32, cpu, cfg))
    monkeypatch.undo()
    for what, key in changed.items():
        assert key != base, what


def test_cache_directory_miss_and_hit(tmp_path):
    cache = CompileCache(str(tmp_path), {"a": 1})
    assert cache.manifest() is None
    cache.save_manifest({"report": {"pieces": 3}})
    assert CompileCache(str(tmp_path), {"a": 1}).manifest()["report"]["pieces"] == 3
    assert CompileCache(str(tmp_path), {"a": 2}).manifest() is None
    assert CompileCache(str(tmp_path), {"a": 1}, enabled=False).manifest() is None


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"mode": 3, "unknown_knob": 1}, "unknown_knob"),
        ({"mode": 9}, "mode"),
        ({"mode": "fast"}, "mode"),
        ({"compile_sizes": [0, 4]}, "compile_sizes"),
        ({"compile_sizes": "8"}, "compile_sizes"),
        ({"backend": "tvm"}, "backend"),
        ({"splitting_ops": ["attention"]}, "splitting_ops"),
        ({"pass_config": {"fuse_everything": True}}, "pass_config.fuse_everything"),
        ({"inductor_compile_config": {"not_an_option": 1}}, "inductor_compile_config"),
        ({"cudagraph_mode": "sometimes"}, "cudagraph_mode"),
        ({"cudagraph_capture_sizes": [-1]}, "cudagraph_capture_sizes"),
        (2.5, "compilation_config"),
    ],
)
def test_invalid_configs_rejected(bad, key, tiny_checkpoint):
    with pytest.raises(InvalidCompilationConfig, match=key) as info:
        LLM(tiny_checkpoint("llama"), compilation_config=bad, **ENGINE)
    assert isinstance(info.value, ValueError)


def test_config_forms():
    assert CompilationConfig.parse(3).mode == CompilationMode.PIECEWISE
    assert CompilationConfig.parse("dynamo").mode == CompilationMode.DYNAMO
    assert CompilationConfig.parse({"mode": 2, "compile_sizes": [8, 1, 8]}).compile_sizes == [1, 8]
    cfg = CompilationConfig(mode=1)
    assert CompilationConfig.parse(cfg) == cfg
    assert CompilationConfig.parse(None).mode is None
    assert CompilationConfig().resolved_mode("cpu") == CompilationMode.NONE
    assert CompilationConfig().resolved_mode("cuda") == CompilationMode.PIECEWISE
    with pytest.raises(ValueError, match="compile_sizes"):
        CompilationConfig(compile_sizes=[-3])


def test_enforce_eager_bypasses_compilation(tiny_checkpoint):
    graphs = counters["stats"]["unique_graphs"]
    with LLM(tiny_checkpoint("llama"), enforce_eager=True, compilation_config=3, **ENGINE) as llm:
        worker = llm.llm_engine.worker
        assert worker.compiled is None and worker.runner.forward == worker.model.forward
        _generate(llm, _prompts(0, 2), max_tokens=2)
        assert llm.compile_report().mode == "none"
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU default")
def test_cpu_default_is_eager(tiny_checkpoint):
    with LLM(tiny_checkpoint("llama"), **ENGINE) as llm:
        assert llm.compile_report().mode == "none"
        assert "compilation off" in llm.compile_report().summary()


@pytest.mark.parametrize("mode", ["dynamo", "inductor"])
def test_other_modes_match_eager(mode, tiny_checkpoint, eager_outputs, cache_root):
    cfg = {"mode": mode, "cache_dir": cache_root}
    with LLM(tiny_checkpoint("llama"), compilation_config=cfg, **ENGINE) as llm:
        got = [_generate(llm, _prompts(seed, n)) for seed, n in BATCHES[:3]]
        report = llm.compile_report()
    for expected, batch in zip(eager_outputs["llama"], got):
        _assert_same(expected, batch)
    assert report.mode == mode and report.graphs_captured == 1 and report.recompilations == 0
    if mode == "dynamo":
        assert report.cache_status == "disabled" and report.inductor_s == 0 and report.unique_compiles == 0


def test_identical_pieces_compile_once(tmp_path, tokenizer_dir, cache_root):
    """Four layers: five pieces, but the three middle ones are one graph (backend eager: no Inductor)."""
    from conftest import make_tiny_checkpoint

    path = make_tiny_checkpoint(str(tmp_path), "llama", tokenizer_dir, num_hidden_layers=4)
    cfg = {"mode": "piecewise", "backend": "eager", "cache_dir": cache_root}
    with LLM(path, compilation_config=cfg, **ENGINE) as llm, LLM(path, enforce_eager=True, **ENGINE) as eager:
        _assert_same(_generate(eager, _prompts(5, 3)), _generate(llm, _prompts(5, 3)))
        report = llm.compile_report()
        split = llm.llm_engine.worker.compiled.split_module
    assert (report.pieces, report.splitting_pieces, report.unique_compiles) == (5, 4, 3)
    pieces = _pieces(split)
    assert len({p.graph_hash for p in pieces}) == 3
    assert pieces[1].general is pieces[2].general is pieces[3].general


def test_many_compiled_models_in_one_process(tiny_checkpoint):
    """Each compiled forward has its own Dynamo cache: Dynamo's per-code limit (8) never trips."""
    from kiln.compiler.compiled_forward import CompiledForward
    from kiln.models.loader import build_model

    path = tiny_checkpoint("llama")
    mc = ModelConfig.from_dict(read_config(path))
    cfg = CompilationConfig(mode="dynamo", use_cache=False)
    for _ in range(10):
        model = build_model(path, mc, torch.float32, torch.device("cpu"))
        forward = CompiledForward(
            model, mc, cfg, cfg.mode, torch.float32, torch.device("cpu"), trace_tokens=8
        )
        assert forward.warmup().graphs_captured == 1
        forward._dummy_run(3)
        assert forward.report.recompilations == 0


def test_static_compile_defaults():
    cfg = CompilationConfig()
    assert cfg.compile_sizes == []
    assert cfg.static_inductor_options() == {"coordinate_descent_tuning": True}
    mine = CompilationConfig(inductor_compile_config={"coordinate_descent_tuning": False})
    assert mine.static_inductor_options() == {"coordinate_descent_tuning": False}
    assert CompilationConfig(tune_static_compiles=False).static_inductor_options() == {}
    # kiln::gemv takes the one-row products: tuning would decompose them before the pass sees them
    assert CompilationConfig(pass_config={"fuse_gemv": True}).static_inductor_options() == {}
