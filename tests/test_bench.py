"""Smoke tests of ``kiln bench`` on CPU with the tiny random shape: each subcommand writes its JSON,
plots and table; plus unit tests of the shared pieces."""

import json
import os
import subprocess
import sys

import pytest

from kiln.bench import common, env, shapes, workload
from kiln.cli import main

# tiny engine settings shared by every smoke test: small KV cache, a couple of requests and tokens
TINY = ["--model", "tiny", "--kv-cache-memory-bytes", str(4 << 20), "--no-progress"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path):
    with open(path) as f:
        return json.load(f)


def _check_common(doc, kind):
    assert doc["benchmark"] == kind
    assert doc["command"].startswith(f"kiln bench {kind}")
    for key in ("torch", "triton", "transformers", "kiln", "kiln_git", "python"):
        assert key in doc["versions"]
    assert doc["machine"]["device"] in ("cpu", "cuda")
    assert doc["config"]["model"]["shape"] == "tiny"


def _nonempty_png(path):
    assert os.path.isfile(path) and os.path.getsize(path) > 1000
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ shared pieces


@pytest.mark.parametrize("name", sorted(shapes.SHAPES))
def test_shapes_parse_in_kiln_and_transformers(name, tmp_path):
    from transformers import AutoConfig

    from kiln.models.config import ModelConfig

    source = shapes.resolve_model(name, directory=str(tmp_path / name))
    assert source.load_format == "dummy" and source.shape == name
    assert os.listdir(source.path) == ["config.json"]
    mc = ModelConfig.from_dict(_load(os.path.join(source.path, "config.json")))
    cfg = shapes.shape_config(name)
    assert mc.vocab_size == cfg["vocab_size"] and mc.num_layers == cfg["num_hidden_layers"]
    assert cfg["torch_dtype"] == "bfloat16" and cfg["max_position_embeddings"] > 0
    hf = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    assert hf.num_hidden_layers == cfg["num_hidden_layers"]


def test_named_shape_sizes():
    # parameter counts (embeddings included) of the real checkpoints these shapes copy
    def params(c):
        h, i, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
        hd = c["head_dim"]
        attn = h * hd * (c["num_attention_heads"] * 2 + c["num_key_value_heads"] * 2)
        emb = v * h * (1 if c["tie_word_embeddings"] else 2)
        return n * (attn + 3 * h * i) + emb

    assert abs(params(shapes.SHAPES["llama-8b"]) / 8.03e9 - 1) < 0.01
    assert abs(params(shapes.SHAPES["llama-1b"]) / 1.24e9 - 1) < 0.01
    assert abs(params(shapes.SHAPES["qwen3-0.6b"]) / 0.596e9 - 1) < 0.02


def test_unknown_model_is_a_clear_error():
    with pytest.raises(SystemExit, match="named shapes"):
        main(["bench", "throughput", "--model", "llama-3b", "--no-progress"])


def test_synthetic_workload_is_seeded_and_sized():
    a = workload.synthetic(5, 20, 7, 512, seed=3)
    b = workload.synthetic(5, 20, 7, 512, seed=3)
    assert [r.prompt_token_ids for r in a.requests] == [r.prompt_token_ids for r in b.requests]
    assert all(len(r.prompt_token_ids) == 20 and r.output_len == 7 for r in a.requests)
    assert all(0 <= t < 512 for r in a.requests for t in r.prompt_token_ids)
    c = workload.synthetic(50, 100, 40, 512, seed=1, range_ratio=0.5)
    assert all(50 <= len(r.prompt_token_ids) <= 150 and 20 <= r.output_len <= 60 for r in c.requests)
    assert len({len(r.prompt_token_ids) for r in c.requests}) > 1
    assert c.num_input_tokens == sum(len(r.prompt_token_ids) for r in c.requests)


def test_jsonl_workload(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt_token_ids": [5, 6, 7], "output_len": 3}\n\n{"prompt_token_ids": [9]}\n')
    wl = workload.from_jsonl(str(path), 512, output_len=4, num_prompts=5)
    assert [len(r.prompt_token_ids) for r in wl.requests] == [3, 1, 3, 1, 3]
    assert [r.output_len for r in wl.requests] == [3, 4, 3, 4, 3]
    path.write_text('{"prompt": "hello"}\n')
    with pytest.raises(ValueError, match="tokenizer"):
        workload.from_jsonl(str(path), 512, 4)
    path.write_text('{"prompt_token_ids": [600]}\n')
    with pytest.raises(ValueError, match="outside the vocabulary"):
        workload.from_jsonl(str(path), 512, 4)


def test_percentiles_and_stage_times():
    p = common.percentiles([4.0, 1.0, 3.0, 2.0])
    assert p["mean"] == 2.5 and p["min"] == 1.0 and p["max"] == 4.0 and p["p50"] == 2.5 and p["n"] == 4
    assert common.percentiles([])["p99"] is None
    st = common.stage_times(
        {"stages": {"dynamo_s": 1.5, "inductor": 2.0}, "cudagraph_capture_s": 0.5, "x": "y"}
    )
    assert st == {"dynamo": 1.5, "passes": None, "inductor": 2.0, "cache_load": None, "graph_capture": 0.5}
    assert common.stage_times(None) == dict.fromkeys(common.STAGES)


def test_env_records_machine_versions_and_sha(monkeypatch):
    doc = env.collect(["kiln", "bench", "x"], {"a": 1})
    assert doc["command"] == "kiln bench x" and doc["config"] == {"a": 1}
    assert doc["versions"]["torch"] and doc["machine"]["cpu_count"]
    monkeypatch.setenv("KILN_GIT_SHA", "abc123")
    assert env.kiln_git() == {"sha": "abc123", "dirty": None, "source": "KILN_GIT_SHA"}


def test_example_sweep_configs_are_valid():
    from kiln.bench.sweep import load_configs

    entries = load_configs(os.path.join(REPO, "benchmarks", "sweep_configs.json"))
    names = [e["name"] for e in entries]
    assert "eager" in names and len(names) >= 8
    assert all(e.get("enforce_eager") or isinstance(e.get("compilation_config"), dict) for e in entries)


# ------------------------------------------------------------------------------------ CLI smoke tests


def test_throughput_smoke_with_hf_compare(tmp_path, capsys):
    main(
        [
            "bench",
            "throughput",
            *TINY,
            "--num-prompts",
            "6",
            "--input-len",
            "16",
            "--output-len",
            "4",
            "--range-ratio",
            "0.25",
            "--compare",
            "hf",
            "--output-dir",
            str(tmp_path),
            "--tag",
            "t",
        ]
    )
    doc = _load(tmp_path / "bench_throughput_t.json")
    _check_common(doc, "throughput")
    k = doc["results"]["kiln"]
    wl = workload.synthetic(6, 16, 4, shapes.SHAPES["tiny"]["vocab_size"], seed=0, range_ratio=0.25)
    assert k["num_requests"] == 6
    assert k["num_input_tokens"] == wl.num_input_tokens and k["num_output_tokens"] == wl.num_output_tokens
    assert k["total_tokens_per_s"] > 0 and k["requests_per_s"] > 0 and k["memory"]["peak_bytes"] > 0
    (hf,) = doc["results"]["hf"]
    assert hf["variant"] == "eager" and hf["total_tokens_per_s"] > 0
    assert doc["results"]["ratio_kiln_over_hf"]["eager"] > 0
    assert doc["config"]["llm_kwargs"]["load_format"] == "dummy"
    capsys.readouterr()
    assert main(["bench", "report", "--results-dir", str(tmp_path)]) == 0
    assert "| bench_throughput_t.json | CPU" in capsys.readouterr().out


def test_throughput_from_jsonl_dataset(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt_token_ids": [100 + i] * (4 + i), "output_len": 2}) + "\n" for i in range(3)
        )
    )
    main(
        [
            "bench",
            "throughput",
            *TINY,
            "--dataset",
            str(data),
            "--num-prompts",
            "3",
            "--num-warmup-prompts",
            "0",
            "--output-dir",
            str(tmp_path),
        ]
    )
    k = _load(tmp_path / "bench_throughput.json")["results"]["kiln"]
    assert k["num_input_tokens"] == 4 + 5 + 6 and k["num_output_tokens"] == 6


def test_latency_smoke(tmp_path):
    main(
        [
            "bench",
            "latency",
            *TINY,
            "--batch-sizes",
            "1,3",
            "--input-len",
            "8",
            "--output-len",
            "4",
            "--num-iters",
            "2",
            "--compare",
            "hf",
            "--hf-variants",
            "eager",
            "--output-dir",
            str(tmp_path),
        ]
    )
    doc = _load(tmp_path / "bench_latency.json")
    _check_common(doc, "latency")
    rows = doc["results"]["kiln"]["batches"]
    assert [r["batch_size"] for r in rows] == [1, 3]
    roof = doc["results"]["kiln"]["roofline"]
    assert roof["weight_bytes"] > 0 and roof["read_bandwidth_Bps"] > 0
    assert roof["tpot_s"] == pytest.approx(roof["weight_bytes"] / roof["read_bandwidth_Bps"])
    for r in rows:
        assert r["ttft_s"]["n"] == 2 * r["batch_size"] and r["tpot_s"]["p50"] > 0 and r["e2e_s"]["p99"] > 0
        # the queue part of TTFT: arrival to the first scheduling step, within the TTFT
        assert r["queue_s"]["n"] == r["ttft_s"]["n"] and 0 <= r["queue_s"]["max"] <= r["ttft_s"]["max"]
    assert set(doc["results"]["ratio_kiln_over_hf"]["eager"]) == {"1", "3"}
    _nonempty_png(tmp_path / "bench_latency_tpot.png")
    main(["bench", "report", "--results-dir", str(tmp_path), "--output", str(tmp_path / "r.md")])
    report = (tmp_path / "r.md").read_text()
    assert "### Latency" in report and "| bench_latency.json | CPU" in report


def test_compile_smoke(tmp_path):
    main(
        [
            "bench",
            "compile",
            *TINY,
            "--enforce-eager",
            "--batch-size",
            "2",
            "--input-len",
            "8",
            "--output-len",
            "2",
            "--output-dir",
            str(tmp_path),
        ]
    )
    doc = _load(tmp_path / "bench_compile.json")
    _check_common(doc, "compile")
    phases = doc["results"]["phases"]
    assert set(phases) == {"cold", "warm"}
    for r in phases.values():
        assert "error" not in r, r
        assert r["startup_s"] > 0 and r["import_s"] > 0 and r["ready_s"] >= r["startup_s"]
        assert set(r["stages_s"]) == set(common.STAGES)
        phases = r["timeline"]["phases_s"]  # the engine's own start-up timeline, first token included
        assert phases["weight_load"] >= 0 and phases["first_token"] > 0 and "import" in phases
        assert r["ready_to_first_token_s"] > r["timeline"]["llm_s"]
    _nonempty_png(tmp_path / "bench_compile.png")


def test_compile_profile_dir(tmp_path):
    """``--profile-dir``: each start-up's cProfile of ``LLM()``, loadable, with the engine's own calls."""
    import pstats

    prof = tmp_path / "prof"
    main(
        ["bench", "compile", *TINY, "--enforce-eager", "--batch-size", "1", "--input-len", "4",
         "--output-len", "1", "--output-dir", str(tmp_path), "--profile-dir", str(prof)]
    )  # fmt: skip
    for phase in ("cold", "warm"):
        stats = pstats.Stats(str(prof / f"{phase}.prof"))
        assert any(func[2] == "load_model" for func in stats.stats), phase
        assert "cumulative" in (prof / f"{phase}.txt").read_text()


def test_sweep_smoke(tmp_path):
    configs = tmp_path / "configs.json"
    configs.write_text(
        json.dumps(
            [
                {"name": "eager", "enforce_eager": True},
                {"name": "eager-block32", "enforce_eager": True, "llm_kwargs": {"block_size": 32}},
                {"name": "broken", "enforce_eager": True, "llm_kwargs": {"max_num_seqs": -1}},
            ]
        )
    )
    main(
        [
            "bench",
            "sweep",
            *TINY,
            "--configs",
            str(configs),
            "--batch-sizes",
            "1,2",
            "--input-len",
            "8",
            "--output-len",
            "3",
            "--num-iters",
            "1",
            "--num-prompts",
            "4",
            "--output-dir",
            str(tmp_path),
        ]
    )
    doc = _load(tmp_path / "bench_sweep.json")
    _check_common(doc, "sweep")
    rows = {r["name"]: r for r in doc["results"]["configs"]}
    assert "error" not in rows["eager"] and "error" not in rows["eager-block32"]
    assert "max_num_seqs" in rows["broken"]["error"]
    assert rows["eager"]["throughput"]["total_tokens_per_s"] > 0
    assert [x["batch_size"] for x in rows["eager"]["latency"]] == [1, 2]
    table = (tmp_path / "bench_sweep.md").read_text()
    for name in ("eager", "eager-block32", "broken"):
        assert f"| {name} |" in table
    assert "failed:" in table and "TPOT ms @2" in table
    for plot in ("tpot", "throughput", "startup"):
        _nonempty_png(tmp_path / f"bench_sweep_{plot}.png")
    assert doc["results"]["complete"] is True


def test_sweep_keeps_finished_configs_when_cut_short(tmp_path, monkeypatch):
    from kiln.bench import sweep

    configs = tmp_path / "configs.json"
    configs.write_text(
        json.dumps([{"name": "a", "enforce_eager": True}, {"name": "b", "enforce_eager": True}])
    )
    calls = []

    def fake_child(module, spec, env, timeout):
        calls.append(spec)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is stopped while the second config runs
        return {"error": "measured nothing (stand-in)"}

    monkeypatch.setattr(sweep.common, "run_child", fake_child)
    args = ["bench", "sweep", *TINY, "--configs", str(configs), "--num-prompts", "0"]
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--output-dir", str(tmp_path)])
    doc = _load(tmp_path / "bench_sweep.json")
    assert [r["name"] for r in doc["results"]["configs"]] == ["a"]
    assert doc["results"]["complete"] is False


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "bench", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for sub in ("throughput", "latency", "compile", "sweep"):
        assert sub in out
