"""benchmarks/compare_table.py: a compare_trees.sh run's table, the throughput repeats' median."""

import importlib.util
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _table_module():
    path = os.path.join(HERE, "..", "benchmarks", "compare_table.py")
    spec = importlib.util.spec_from_file_location("compare_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path, data):
    with open(path, "w") as f:
        json.dump(data, f)


def test_throughput_repeats_give_their_median(tmp_path):
    for which, ms in (("base", 1.0), ("new", 0.9)):
        latency = {"results": {"kiln": {"batches": [{"tpot_s": {"mean": ms / 1e3}}]}}}
        latency["versions"] = {"kiln_git": {"sha": which}}
        _write(tmp_path / f"bench_latency_T_m_{which}.json", latency)
    for i, (base, new) in enumerate([(100, 110), (130, 90), (120, 115)]):
        suffix = "" if i == 0 else f"_r{i + 1}"
        for which, tok_s in (("base", base), ("new", new)):
            result = {"results": {"kiln": {"total_tokens_per_s": tok_s}}}
            _write(tmp_path / f"bench_throughput_T_m_{which}{suffix}.json", result)
    (row,) = _table_module().rows(str(tmp_path), "T")
    assert row["tok_s_runs_base"] == [100, 130, 120] and row["tok_s_base"] == 120
    assert row["tok_s_runs_new"] == [110, 90, 115] and row["tok_s_new"] == 110
    assert abs(row["tpot_ms_new"] - 0.9) < 1e-9 and row["sha_base"] == "base"
