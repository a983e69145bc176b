"""Smoke runs of the benchmark scripts: each script in its own process, with the flags that
``benchmarks/run_h200_features.sh`` passes, on the ``tiny`` shape or a tiny checkpoint and tiny counts, so
that a renamed flag or a device-specific assumption fails here and not on the GPU machine. Each run must
exit 0 and write its results with the fields the benchmark tables read; nothing timed is asserted.

On a CUDA machine the same runs take the GPU code paths (``run_h200_features.sh smoke``)."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_checkpoint

from kiln.bench.limits import forward_flops
from kiln.bench.shapes import SHAPES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEATURES_SH = os.path.join(ROOT, "benchmarks", "run_h200_features.sh")
TIMEOUT_S = 300  # per script; a CPU run takes seconds, a GPU run compiles first
KV = ["--kv-cache-memory-bytes", str(4 << 20)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# run_h200_features.sh part -> the smoke calls standing for it ({out}, {ckpt}, {tok}: filled per test)
CALLS = {
    "streaming": [
        "benchmarks/streaming.py --model tiny --streams 6 --input-len 8 --output-len 4 --repeats 1 "
        "--ttft-reps 2 --handoff-wait 0 --out {out}/bench_streaming_tiny.json"
    ],
    "soak": [
        "benchmarks/async_soak.py --model tiny --requests 40 --coroutines 8 --max-prompt 24 --max-tokens 8 "
        "--kv-cache-memory-bytes 262144 --out {out}/bench_async_soak_tiny.json"
    ],
    "beam": [
        "benchmarks/beam_search.py --model tiny --prompts 5 --width 4 --new-tokens 4 --prompt-len 8 "
        "--hf-batch 2 --out {out}/bench_beam_search_tiny.json"
    ],
    "structured": [
        "benchmarks/structured.py --model {ckpt} --tokenizer {tok} --output-dir {out} --batch-size 3 "
        "--input-len 8 --output-len 6 --repeats 1"
    ],
    "pooling": [
        "benchmarks/pooling.py --models tiny --output {out}/bench_pooling_tiny.json --num-prompts 12 "
        "--input-len 16 --hf-batch-size 5 --num-warmup 2 --no-progress"
    ],
    "lora": [
        "benchmarks/lora.py --model tiny --tag smoke --output-dir {out} --input-len 8 --output-len 3 "
        "--num-iters 1 --swap-reps 2 --profile"
    ],
    "lora-kernels": [
        "benchmarks/lora_kernels.py --models tiny --batch-sizes 1,4,17 --sweep --stacked "
        "--output {out}/lora_kernels.json"
    ],
    "fp8": [
        "benchmarks/fp8.py --models tiny --output-dir {out} --latency-args '--input-len 8 --output-len 4 "
        "--num-iters 1' --throughput-args '--num-prompts 4 --input-len 8 --output-len 4' " + " ".join(KV)
    ],
    "fp8-gemv": [
        "benchmarks/fp8.py --models tiny --variants bf16,fp8 --parts latency --output-dir {out}/fp8_gemv "
        "--latency-args '--input-len 8 --output-len 4 --num-iters 1' "
        '-cc \'{{"compile_sizes": [1], "pass_config": {{"fuse_gemv": true, "fuse_fp8_gemv": true}}}}\' '
        + " ".join(KV)
    ],
    "sleep": [
        "benchmarks/sleep_mode.py --model tiny --level 1 --max-model-len 256 "
        "--out {out}/bench_sleep_tiny.json"
    ],
    "warm": [
        "-m kiln.cli bench throughput --model tiny --num-prompts 6 --input-len 16 --output-len 4 "
        "--num-warmup-prompts 3 --no-progress --tag warm3_new_1 --output-dir {out} " + " ".join(KV)
    ],
    "startup-floor": [
        "benchmarks/weight_loading.py make {out}/ckpt-tiny --shape tiny",
        "benchmarks/startup_floor.py --repeats 1 --model {out}/ckpt-tiny --out {out}/startup_floor_tiny.json",
    ],
    "startup": [
        "benchmarks/weight_loading.py make {out}/ckpt-tiny --shape tiny --tokenizer {tok}",
        "benchmarks/weight_loading.py load {out}/ckpt-tiny --device " + DEVICE + " --repeat 1 "
        "--out {out}/weight_loading_tiny.json",
        "-m kiln.cli bench compile --model {out}/ckpt-tiny --load-tokenizer --output-dir {out} "
        "--tag tiny_disk --batch-size 2 --input-len 8 --output-len 2 " + " ".join(KV),
        "-m kiln.cli bench compile --model {out}/ckpt-tiny --load-tokenizer "
        "-cc '{{\"reuse_dynamo_graph\": true}}' --output-dir {out} --tag tiny_disk_reuse "
        "--batch-size 2 --input-len 8 --output-len 2 " + " ".join(KV),
    ],
}

# the same commands with Python's bytecode cache on: the startup test runs them
CALLS["startup-bytecode"] = [CALLS["startup"][0], CALLS["startup"][2]]


def run(call: str, tmp_path, **fill) -> str:
    """Run one call (a script path or ``-m module`` and its arguments) in a fresh interpreter, in the
    repository root as run_h200_features.sh does; return its stdout, failing with its output's tail."""
    argv = shlex.split(call.format(out=tmp_path, **fill))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env["PYTHONUNBUFFERED"] = "1"
    if DEVICE == "cpu":  # tiny ops on a busy small machine run many times slower on several threads
        env.setdefault("OMP_NUM_THREADS", "1")
    try:
        proc = subprocess.run(
            [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{call} ran past {TIMEOUT_S} s:\n{(e.stdout or '')[-2000:]}\n{(e.stderr or '')[-3000:]}")
    assert proc.returncode == 0, (
        f"{call} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
    return proc.stdout


def load(path) -> dict:
    with open(path) as f:
        return json.load(f)


def check_env(doc: dict, benchmark: str) -> None:
    assert doc["benchmark"] == benchmark
    assert doc["versions"]["torch"] and doc["machine"]["device"] == DEVICE


# ----------------------------------------------------------------------------- run_h200_features.sh


def feature_parts() -> dict[str, str]:
    """Each part of run_h200_features.sh -> the text of its case arm."""
    text = open(FEATURES_SH).read()
    body = text[text.index('case "$1" in') : text.index("esac")]
    return {m.group(1): m.group(2) for m in re.finditer(r"^    ([\w-]+)\)(.*?);;", body, re.S | re.M)}


def flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-cc)\b", text))


def test_smoke_calls_pass_every_flag_of_the_gpu_runs():
    """Each benchmark part of the GPU script has smoke calls here running the same scripts with at
    least the flags it passes, so a flag renamed on one side fails this test."""
    parts = feature_parts()
    assert {"tests", "tests-serial", "smoke", "startup", "warm"} <= set(parts)
    for part, arm in parts.items():
        if part in ("tests", "tests-serial", "smoke"):
            continue
        assert part in CALLS, f"part {part!r} of run_h200_features.sh has no smoke call"
        calls = " ".join(CALLS[part])
        scripts = set(re.findall(r"benchmarks/\w+\.py|kiln\.cli bench \w+", arm))
        assert scripts and all(s in calls for s in scripts), (part, scripts)
        subcommands = set(re.findall(r"weight_loading\.py (\w+)", arm))
        assert all(f"weight_loading.py {s}" in calls for s in subcommands), (part, subcommands)
        missing = flags(arm) - flags(calls)
        assert not missing, f"part {part!r}: the smoke calls lack {sorted(missing)}"


def test_gpu_test_parts_select_gpu_tests_of_existing_files():
    """The parallel part runs every test file but those it leaves to the serial part, which runs them."""
    parts = feature_parts()
    for part in ("tests", "tests-serial"):
        assert " -m gpu " in parts[part], f"part {part} must select the GPU tests only"
    ignored = re.findall(r"--ignore=(tests/\w+\.py)", parts["tests"])
    serial = parts["tests-serial"].split('"$PY"')[1]  # its first pytest command
    assert ignored and set(ignored) == set(re.findall(r"tests/\w+\.py", serial))
    assert all(os.path.isfile(os.path.join(ROOT, f)) for f in ignored), ignored
    assert "tests/test_bench_scripts.py" in parts["smoke"]


# ----------------------------------------------------------------------------- the GPU runs' scripts


def test_patterned_prompts_keep_the_large_shapes_ids():
    """streaming, beam_search and sleep_mode fit their prompts to the model's vocabulary; on the shapes
    the GPU runs use the ids are those of the fixed formula they always used."""
    from kiln.bench.workload import patterned_ids

    for name in ("llama-1b", "llama-8b", "qwen3-0.6b"):
        vocab = SHAPES[name]["vocab_size"]
        for i in (0, 5, 63):
            assert patterned_ids(i, 152, vocab) == [(7 * i + 13 * j) % 30000 + 100 for j in range(152)]
    ids = [t for i in range(64) for t in patterned_ids(i, 256, SHAPES["tiny"]["vocab_size"])]
    assert min(ids) == 100 and max(ids) == SHAPES["tiny"]["vocab_size"] - 1
    with pytest.raises(ValueError, match="vocab_size"):
        patterned_ids(0, 4, 100)


def test_streaming(tmp_path):
    (call,) = CALLS["streaming"]
    run(call, tmp_path)
    doc = load(tmp_path / "bench_streaming_tiny.json")
    assert doc["benchmark"] == "streaming" and doc["config"]["streams"] == 6
    r = doc["results"]
    (one,) = r["runs"]
    assert one["stream_tokens"] == one["generate_tokens"] == 6 * 4  # every stream ran to max_tokens
    assert 2 <= one["stream_outputs_per_request"] <= 4  # the first token and the end at least
    assert r["stream_output_tok_s"] > 0 and r["generate_output_tok_s"] > 0 and r["stream_over_generate"] > 0
    assert r["ttft_stream_ms"] > 0 and r["ttft_generate_ms"] > 0 and r["ttft_ratio"] > 0
    assert one["stream_steps"] > 0 and one["generate_steps"] > 0
    assert r["stream_cpu_us_per_step"] > 0 and r["generate_cpu_us_per_step"] > 0


def test_streaming_host_cost_without_the_model(tmp_path):
    """``--fake-device-ms``: the engine's worker is a constant one (token 7 for every row, a simulated
    device step of that long), so the run measures the host side only; both paths still produce every
    token, in as many engine steps as a real model would take."""
    run(
        "benchmarks/streaming.py --model tiny --streams 5 --input-len 8 --output-len 6 --repeats 2 "
        "--ttft-reps 2 --fake-device-ms 0.2 --fake-launch-ops 3 --handoff-wait 0.001 --out {out}/host.json",
        tmp_path,
    )
    doc = load(tmp_path / "host.json")
    assert doc["config"]["fake_device_ms"] == 0.2 and doc["config"]["fake_launch_ops"] == 3
    runs = doc["results"]["runs"]
    assert len(runs) == 2
    for one in runs:
        assert one["stream_tokens"] == one["generate_tokens"] == 5 * 6
        # one prefill step and one step per further token, plus the step that reads the last one back
        # (streams that reach the engine thread a step apart take more)
        assert one["generate_steps"] == 1 + 6 <= one["stream_steps"]
    # the breakdown: every phase of a streamed first token (prefill, then the step reading it back)
    b = doc["results"]["breakdown"]
    phases = b["ttft_phases_ms"]
    assert phases["samples"] >= 1 and phases["num_steps"] == b["generate_phases_ms"]["num_steps"] == 2
    for key in ("submit", "pickup", "add", "to_first_step", "steps", "route", "loop_wake", "to_consumer"):
        assert phases[key] >= 0, key
    assert phases["steps"] >= 0.2 and phases["total"] >= phases["steps"] + phases["pickup"]
    assert b["idle_call_round_trip_ms"] > 0
    assert b["stream_steps"]["all"]["count"] >= b["generate_steps"]["all"]["count"] == 7
    assert b["handoffs"]["posts"] >= b["handoffs"]["dispatches"] >= 2  # first tokens and ends at least


def test_async_soak(tmp_path):
    (call,) = CALLS["soak"]
    run(call, tmp_path)
    doc = load(tmp_path / "bench_async_soak_tiny.json")
    check_env(doc, "async_soak")
    r = doc["results"]
    assert r["requests"] == 40 and sum(r["ended"].values()) == 40
    assert r["problems"] == [] and r["free_blocks"] == r["total_blocks"] > 0


def test_beam_search(tmp_path):
    (call,) = CALLS["beam"]
    run(call, tmp_path)
    doc = load(tmp_path / "bench_beam_search_tiny.json")
    assert doc["benchmark"] == "beam_search"
    kiln, hf = doc["results"]["kiln"], doc["results"]["hf"]
    assert kiln["beam_tokens"] == hf["beam_tokens"] == 5 * 4 * 4  # prompts x width x new tokens
    assert kiln["computed_tokens"] == kiln["expected_computed_tokens"] == 5 * (8 + 4 * 3)
    assert kiln["tok_s"] > 0 and hf["tok_s"] > 0 and doc["results"]["speedup"] > 0
    assert 0 < kiln["search_ms_per_step_outside_engine"] < kiln["ms_per_search_step"]


def test_beam_host(tmp_path):
    """The CPU measure of a beam step's host cost (not a GPU part): every phase reported."""
    run(
        "benchmarks/beam_host.py --vocab-size 512 --prompts 3 --width 2 --new-tokens 3 --prompt-len 8 "
        "--repeats 1 --out {out}/beam_host.json",
        tmp_path,
    )
    doc = load(tmp_path / "beam_host.json")
    check_env(doc, "beam_host")
    median = doc["results"]["ms_per_step_median"]
    assert set(median) == {
        "total",
        "forward",
        "lm_head",
        "sampler",
        "engine_rest",
        "search",
        "host_without_sampler",
    }
    assert median["total"] > 0 and doc["results"]["steps"] == 3


def test_structured(tmp_path, tokenizer_dir):
    """On a tiny checkpoint whose vocabulary outgrows its tokenizer's, as llama-1b's outgrows SmolLM2's
    in the GPU run: the grammar masks cover ids the tokenizer lacks."""
    pytest.importorskip("xgrammar")
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 320
    ckpt = make_tiny_checkpoint(str(tmp_path / "wide"), "llama", tokenizer_dir, vocab_size=vocab)
    (call,) = CALLS["structured"]
    out = run(call, tmp_path, ckpt=ckpt, tok=tokenizer_dir)
    path = tmp_path / "bench_structured_wide.json"
    assert f"wrote {path}" in out
    doc = load(path)
    check_env(doc, "structured")
    assert doc["config"]["engine"]["model"] == ckpt
    r = doc["results"]
    for kind in ("unconstrained", "constrained"):
        (batch,) = r["throughput"][kind]
        assert batch["output_tokens_per_s"] > 0 and batch["num_output_tokens"] > 0
    assert r["throughput"]["unconstrained"][0]["num_output_tokens"] == 3 * 6  # EOS ignored
    (constrained,) = r["throughput"]["constrained"]
    assert constrained["num_output_tokens"] == 3 * 6  # the schema's minimum keeps them inside it
    assert constrained["fills"] >= 6 and 0 <= constrained["shared_fills"] <= constrained["fills"]
    assert r["throughput"]["unconstrained"][0]["fills"] == 0
    assert r["throughput"]["ratio"] > 0 and r["throughput"]["ratio_of_medians"] > 0
    assert constrained["full_gc_collections"] >= 0
    assert len(r["batch1_tpot_s"]["constrained"]) == 3 and r["batch1_tpot_s"]["median"]["constrained"] > 0
    assert set(r["compile"]["schemas"]) == {"bench", "person", "tool_call"}
    assert all(row["cold_s"] > 0 and row["cached_s"] > 0 for row in r["compile"]["schemas"].values())


def test_pooling(tmp_path):
    (call,) = CALLS["pooling"]
    run(call, tmp_path)
    doc = load(tmp_path / "bench_pooling_tiny.json")
    check_env(doc, "pooling")
    assert "--models tiny" in doc["command"]
    row = doc["results"]["tiny"]
    assert row["kiln"]["prompt_tokens"] == row["hf"]["prompt_tokens"] == 12 * 16
    assert row["kiln"]["embedding_dim"] == 64 and row["kiln_over_hf"] > 0
    assert row["forward_flops"] == forward_flops(SHAPES["tiny"], 16, 12)
    assert row["kiln"]["tflops"] > 0 and row["hf"]["tflops"] > 0
    assert doc["gemm_tflops"] > 0 and row["kiln_over_hf_bound"] > 0


def test_lora(tmp_path):
    (call,) = CALLS["lora"]
    out = run(call, tmp_path)
    path = tmp_path / "bench_lora_tiny_smoke.json"
    assert f"wrote {path}" in out
    doc = load(path)
    check_env(doc, "lora_tiny")
    r = doc["results"]
    for key in (
        "base_batch64_tpot_s",
        "base_batch1_tpot_s",
        "lora_batch64_4_adapters_tpot_s",
        "lora_batch1_1_adapter_tpot_s",
        "swap_in_s",
        "adapter_load_from_disk_s",
        "ratio_batch64_4_adapters",
        "ratio_batch1_1_adapter",
    ):
        assert r[key] > 0, key
    # rank 16 A and B of all seven projections of the tiny shape's 2 layers, in its bfloat16
    h, inter, kv_dim, layers = 64, 128, 2 * 16, 2
    per_layer = 16 * ((h + h) * 2 + (h + kv_dim) * 2 + (h + inter) * 3)
    assert r["adapter_bytes"] == per_layer * layers * 2
    assert set(r["targets"]) == {"batch64_4_adapters", "batch1_1_adapter"}
    assert r["ratio_batch1_base_request"] > 0
    # bf16 nn.Linear projections carry the A table: one expand kernel each, 4 projections x 2 layers
    assert r["lora_kernels_per_step"] == {"1": 8, "64": 8}
    assert set(r["profile"]) == {"base_batch1", "lora_batch1_1_adapter"}
    for prof in r["profile"].values():  # no CUDA kernels on a CPU: only the step's wall time
        assert prof["steps"] == 64 and prof["wall_us_per_step"] > 0 and prof["lora_kernel_us_per_step"] >= 0


def test_lora_kernels(tmp_path):
    """Every variant at every batch, each within a bf16 rounding of y of the torch reference."""
    (call,) = CALLS["lora-kernels"]
    out = run(call, tmp_path)
    assert f"wrote {tmp_path / 'lora_kernels.json'}" in out
    doc = load(tmp_path / "lora_kernels.json")
    check_env(doc, "lora_kernels")
    tiny = doc["results"]["tiny"]
    assert tiny["layers"] == 2 and set(tiny["projections"]) == {
        "self_attn.qkv_proj",
        "self_attn.o_proj",
        "mlp.gate_up_proj",
        "mlp.down_proj",
    }
    variants = {"plan", "fused", "split", "grouped", "base_rows"}
    variants |= {f"fused_{p}_programs" for p in (24, 48, 96, 132)}
    variants |= {f"fused_tile_{t}_warps_{w}" for t, w in ((8192, 4), (16384, 4), (32768, 8), (32768, 16))}
    stacked = {"stacked", "stacked_gemm_extra", "stacked_expand", "stacked_grouped", "stacked_grouped_expand"}
    variants |= stacked
    for rows in tiny["projections"].values():
        assert [r["batch"] for r in rows] == [1, 4, 17]
        assert [r["plan_name"] for r in rows] == ["fused", "fused", "grouped"]
        for row in rows:
            assert {v for v in row if isinstance(row[v], dict)} == variants
            for v in variants - stacked:
                assert row[v]["us"] > 0 and row[v]["max_abs_err_vs_torch"] < 0.05, (v, row[v])
            assert row["base_rows"]["max_abs_err_vs_torch"] == 0  # rows without an adapter untouched
            assert row["stacked_expand"]["us"] > 0 and row["stacked_expand"]["max_abs_err_vs_torch"] < 0.05
            assert row["stacked"]["us"] == row["stacked_gemm_extra"]["us"] + row["stacked_expand"]["us"]
            grouped = row["stacked_grouped_expand"]
            assert grouped["us"] > 0 and grouped["max_abs_err_vs_torch"] < 0.05
    assert set(tiny["per_step_us"]) == {"1", "4", "17"}
    assert all(set(step) == variants for step in tiny["per_step_us"].values())


def test_fp8(tmp_path):
    (call,) = CALLS["fp8"]
    run(call, tmp_path)
    summary = load(tmp_path / "bench_fp8_tiny.json")
    check_env(summary, "fp8")
    assert summary["config"]["model"] == "tiny"
    assert set(summary["variants"]) == {"bf16", "fp8", "fp8-kv8"}
    for name, row in summary["variants"].items():
        assert not any(k.endswith("_error") for k in row), (name, row)
        assert row["tpot_ms"] > 0 and row["roofline_tpot_ms"] > 0 and row["total_tokens_per_s"] > 0, name
        assert row["throughput_over_bf16"] > 0 and row["tpot_over_bf16"] > 0
        part = load(tmp_path / f"bench_throughput_fp8_tiny_{name}.json")["results"]["kiln"]
        assert part["num_requests"] == 4 and part["num_output_tokens"] == 4 * 4  # the shrunk workload
        lat = load(tmp_path / f"bench_latency_fp8_tiny_{name}.json")
        assert [b["batch_size"] for b in lat["results"]["kiln"]["batches"]] == [1]
        assert lat["config"]["llm_kwargs"]["dtype"] == "bfloat16"
    assert summary["variants"]["bf16"]["tpot_over_bf16"] == 1.0
    quantized = load(tmp_path / "bench_latency_fp8_tiny_fp8-kv8.json")["config"]["llm_kwargs"]
    assert quantized["quantization"] == "fp8" and quantized["kv_cache_dtype"] == "fp8"


def test_fp8_gemv_part(tmp_path):
    """The static size-1 compile with both GEMV fusions reaches each latency run's engine."""
    (call,) = CALLS["fp8-gemv"]
    run(call, tmp_path)
    summary = load(tmp_path / "fp8_gemv" / "bench_fp8_tiny.json")
    assert set(summary["variants"]) == {"bf16", "fp8"}
    assert all(row["tpot_ms"] > 0 for row in summary["variants"].values())
    for variant in ("bf16", "fp8"):
        kwargs = load(tmp_path / "fp8_gemv" / f"bench_latency_fp8_tiny_{variant}.json")["config"][
            "llm_kwargs"
        ]
        cc = kwargs["compilation_config"]
        assert cc["compile_sizes"] == [1] and cc["pass_config"] == {"fuse_gemv": True, "fuse_fp8_gemv": True}


def test_sleep_mode(tmp_path):
    (call,) = CALLS["sleep"]
    run(call, tmp_path)
    doc = load(tmp_path / "bench_sleep_tiny.json")
    check_env(doc, "sleep_mode")
    assert doc["config"]["model"] == "tiny" and doc["config"]["level"] == 1
    r = doc["results"]
    assert r["greedy_identical"] is True
    assert r["sleep_s"] >= 0 and r["wake_up_s"] >= 0 and r["startup_s"] > 0
    if DEVICE == "cuda":  # device memory is read only on CUDA
        assert 0 < r["asleep_gib"] < r["awake_gib"] and 0 < r["asleep_fraction_of_awake"] < 1
    else:
        assert doc["gpu"] is None and r["awake_gib"] is None and r["asleep_fraction_of_awake"] is None


def test_bench_throughput_with_warmup_prompts(tmp_path):
    (call,) = CALLS["warm"]
    out = run(call, tmp_path)
    assert "tok/s" in out  # the line run_h200_features.sh keeps
    doc = load(tmp_path / "bench_throughput_warm3_new_1.json")
    check_env(doc, "throughput")
    k = doc["results"]["kiln"]
    assert k["num_requests"] == 6 and k["num_output_tokens"] == 6 * 4 and k["num_input_tokens"] == 6 * 16
    assert k["total_tokens_per_s"] > 0
    if DEVICE == "cuda":  # the model FLOP rate against a GEMM timed in the run
        assert 0 < k["limits"]["fraction_of_gemm"] and k["limits"]["model_flops"] > 0
    else:
        assert k["limits"] is None


def test_startup_weight_loading_and_bench_compile(tmp_path, tokenizer_dir):
    make, load_call, compile_plain, compile_reuse = CALLS["startup"]
    run(make, tmp_path, tok=tokenizer_dir)
    assert os.path.isfile(tmp_path / "ckpt-tiny" / "tokenizer_config.json")
    run(load_call, tmp_path)
    wl = load(tmp_path / "weight_loading_tiny.json")
    assert wl["device"].startswith(DEVICE) and wl["checkpoint_gb"] > 0
    assert len(wl["kiln_build_model_s"]) == 1 and wl["kiln_gb_per_s"] > 0 and wl["safetensors_gb_per_s"] > 0
    for call, tag, cc in ((compile_plain, "tiny_disk", None), (compile_reuse, "tiny_disk_reuse", True)):
        run(call, tmp_path)
        doc = load(tmp_path / f"bench_compile_{tag}.json")
        check_env(doc, "compile")
        assert doc["config"]["model"]["path"] == str(tmp_path / "ckpt-tiny")
        assert doc["config"]["llm_kwargs"].get("compilation_config", {}).get("reuse_dynamo_graph") is cc
        for name, phase in doc["results"]["phases"].items():
            assert "error" not in phase, (name, phase)
            assert phase["startup_s"] > 0 and phase["ready_s"] >= phase["startup_s"]
            assert phase["timeline"]["phases_s"]["weight_load"] >= 0
            assert phase["timeline"]["phases_s"]["config"] > 0.01  # the tokenizer loaded
        assert os.path.getsize(tmp_path / f"bench_compile_{tag}.png") > 1000


def test_startup_floor(tmp_path):
    make, floor = CALLS["startup-floor"]
    run(make, tmp_path)
    run(floor, tmp_path)
    doc = load(tmp_path / "startup_floor_tiny.json")
    check_env(doc, "startup_floor")
    (only,) = doc["results"]["runs"]
    assert only["import_torch_s"] > 0 and only["import_kiln_s"] > 0 and only["weight_read_s"] > 0
    assert (only["cuda_context_s"] is None) == (DEVICE == "cpu")
    assert doc["results"]["median"]["floor_s"] >= only["import_torch_s"] + only["weight_read_s"]


# ----------------------------------------------------------------------------- the other scripts


def test_latency_script(tmp_path):
    extra = "--batch-sizes 2 --input-len 8 --output-len 3 --num-iters 1 --hf-variants eager --no-progress"
    run(f"benchmarks/latency.py --models tiny --output-dir {{out}} {extra} " + " ".join(KV), tmp_path)
    doc = load(tmp_path / "bench_latency_tiny.json")
    check_env(doc, "latency")
    assert [r["batch_size"] for r in doc["results"]["kiln"]["batches"]] == [2]
    assert "--compare hf" in doc["command"] and set(doc["results"]["ratio_kiln_over_hf"]["eager"]) == {"2"}


def test_step_profile(tmp_path):
    args = "--model tiny --num-prompts 4 --input-len 8 --output-len 4 --output-dir {out}"
    for tag, more in (("plain", ""), ("bench", " --bench-workload")):
        out = run(f"benchmarks/step_profile.py {args} --tag {tag}{more}", tmp_path)
        path = tmp_path / f"step_profile_{tag}.txt"
        assert f"wrote {path}" in out
        text = path.read_text()
        assert re.search(r"wall \(plain\): [0-9.]+ s = [0-9,]+ total tok/s", text)
        assert "device busy (kernel union)" in text and "== host: top functions by own time ==" in text
        assert "== device: kernels ==" in text


def test_host_step(tmp_path):
    run(
        "benchmarks/host_step.py --num-prompts 6 --input-len 16 --output-len 4 --max-num-seqs 4 --repeats 1 "
        "--output {out}/host_step.json",
        tmp_path,
    )
    r = load(tmp_path / "host_step.json")
    assert r["steps"] > 4 and len(r["cpu_ms_per_step"]) == 1  # 6 prompts at most 4 at a time
    assert r["best_cpu_ms_per_step"] > 0 and r["best_cpu_us_per_token"] > 0
    run(
        "benchmarks/host_step.py --runner-prepare --max-num-seqs 8 --repeats 1 --output {out}/p.json",
        tmp_path,
    )
    r = load(tmp_path / "p.json")
    assert r["rows"] == 8 and r["runner_prepare_cpu_us"] > 0


def test_host_step_sampler(tmp_path):
    run("benchmarks/host_step.py --sampler --max-num-seqs 8 --repeats 1 --output {out}/s.json", tmp_path)
    r = load(tmp_path / "s.json")
    assert r["rows"] == 8 and r["sample_cpu_us"] > 0 and r["command"].endswith("--sampler")


def test_host_step_structured(tmp_path, tokenizer_dir):
    pytest.importorskip("xgrammar")
    from transformers import AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    run(
        f"benchmarks/host_step.py --structured --tokenizer {{tok}} --grow-tokenizer {size + 40} "
        f"--vocab-size {size + 100} --num-prompts 3 --max-num-seqs 2 --input-len 8 --output-len 6 "
        "--repeats 1 --output {out}/st.json",
        tmp_path,
        tok=tokenizer_dir,
    )
    r = load(tmp_path / "st.json")
    assert "--structured" in r["command"] and r["versions"]["xgrammar"] and r["grammar_threads"] >= 1
    for kind in ("constrained", "unconstrained"):
        (one,) = r["runs"][kind]
        assert one["steps"] > 6 and 0 < one["sampled_rows"] <= 3 * 6 and one["cpu_us_per_step"] > 0
    assert r["runs"]["unconstrained"][0]["sampled_rows"] == 3 * 6  # EOS ignored
    assert r["median"]["constrained"] == r["runs"]["constrained"][0]
    # a simulated device step: the device runs the steps one after another, so no step takes less
    run(
        "benchmarks/host_step.py --structured --tokenizer {tok} --num-prompts 3 --max-num-seqs 2 "
        "--input-len 8 --output-len 6 --repeats 1 --fake-device-ms 2 --fake-sampler-ms 0.1 --no-fill-extras "
        "--output {out}/fake.json",
        tmp_path,
        tok=tokenizer_dir,
    )
    r = load(tmp_path / "fake.json")
    assert "one_row_fill" not in r and "--fake-device-ms 2.0" in r["command"]
    for kind in ("constrained", "unconstrained"):
        (one,) = r["runs"][kind]
        assert one["wall_us_per_step"] >= 1990 and one["sampled_rows"] == 3 * 6
    assert 0.5 < r["constrained_over_unconstrained_wall_per_step"] < 5


def test_tp_step_broadcast(tmp_path):
    out = run("benchmarks/tp_step_broadcast.py --seqs 4 --prompt 16 --output 4 --steps 2", tmp_path)
    rows = re.findall(r"^\[mp\] (.+): ([0-9.]+) KiB pickled, ([0-9.]+) ms per step", out, re.M)
    assert [r[0].split(":")[0] for r in rows] == [
        "decode 4 seqs x (16+4) tokens",
        "decode 4 seqs x (16+4) tokens, repetition_penalty (token lists sent)",
        "prefill 8192 tokens (8 x 1024)",
    ]
    sizes = [float(r[1]) for r in rows]
    assert sizes[0] < sizes[1]  # the penalty sends the token lists too
    assert all(float(r[2]) > 0 for r in rows)


def test_compile_script_startup_and_passes(tmp_path):
    # Dynamo only (backend eager): the script's processes and report, without Inductor's C++ builds
    cc = '{{"mode": "piecewise", "backend": "eager"}}'
    run(
        f"benchmarks/compile.py startup --model tiny --warm-runs 1 --max-model-len 256 "
        f"--compilation-config '{cc}' --out {{out}}/startup.json",
        tmp_path,
    )
    r = load(tmp_path / "startup.json")
    assert set(r["runs"]) == {"eager", "cold", "warm1"} and r["model"] == "tiny"
    for name, row in r["runs"].items():
        assert "error" not in row, (name, row)
        assert row["llm_startup_s"] > 0 and len(row["tokens"]) == 4
        assert all(len(t) == 16 for t in row["tokens"])
    assert r["runs"]["eager"]["compile_report"]["mode"] == "none"
    assert (
        r["runs"]["cold"]["compile_report"]["mode"]
        == r["runs"]["warm1"]["compile_report"]["mode"]
        == "piecewise"
    )
    assert r["runs"]["cold"]["compile_report"]["backend"] == "eager"
    assert isinstance(r["runs"]["warm1"]["same_tokens_as_eager"], bool)
    run(
        "benchmarks/compile.py passes --model tiny --layers 1 --tokens 1,16 --iters 1 "
        "--only no_passes,noop_elimination --out {out}/passes.json",
        tmp_path,
    )
    r = load(tmp_path / "passes.json")
    assert r["layers"] == 1 and set(r["variants"]) == {"no_passes", "noop_elimination"}
    for row in r["variants"].values():
        assert {"decode_1_ms", "decode_16_ms", "prefill_16_ms"} <= set(row) and row["compile_s"] > 0
        assert set(row["vs_noop_elimination_pct"]) == {"decode_1_ms", "decode_16_ms", "prefill_16_ms"}
