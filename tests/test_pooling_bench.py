"""benchmarks/pooling.py end to end on the tiny shape (a smoke run, nothing timed is asserted)."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pooling_benchmark_writes_results(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "pooling_bench", os.path.join(ROOT, "benchmarks", "pooling.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "pooling.json"
    argv = ["--models", "tiny", "--num-prompts", "12", "--input-len", "16", "--hf-batch-size", "5"]
    bench.main(argv + ["--num-warmup", "2", "--no-progress", "--enforce-eager", "--output", str(out)])
    doc = json.loads(out.read_text())
    row = doc["results"]["tiny"]
    assert row["kiln"]["prompt_tokens"] == row["hf"]["prompt_tokens"] == 12 * 16
    assert row["kiln"]["embedding_dim"] == 64 and row["kiln_over_hf"] > 0
    assert doc["benchmark"] == "pooling" and "--models tiny" in doc["command"]
    assert doc["machine"]["device"] in ("cpu", "cuda") and doc["versions"]["torch"]
