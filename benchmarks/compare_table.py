"""Table of a ``compare_trees.sh`` run: batch-1 TPOT and total tokens/s, before and after, per model.

python benchmarks/compare_table.py RESULTS_DIR TAG
"""

import glob
import json
import os
import statistics
import sys


def _load(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def rows(results_dir: str, tag: str) -> list[dict]:
    out = []
    models = sorted(
        {
            os.path.basename(p)[len(f"bench_latency_{tag}_") : -len("_base.json")]
            for p in glob.glob(os.path.join(results_dir, f"bench_latency_{tag}_*_base.json"))
        }
    )
    for model in models:
        row = {"model": model}
        for which in ("base", "new"):
            lat = _load(os.path.join(results_dir, f"bench_latency_{tag}_{model}_{which}.json"))
            if lat:
                row[f"tpot_ms_{which}"] = lat["results"]["kiln"]["batches"][0]["tpot_s"]["mean"] * 1e3
                row[f"sha_{which}"] = lat["versions"]["kiln_git"]["sha"]
            # the first run and its repeats (``_r2``, ``_r3``, ... from REPEATS): their median, and each
            runs = [_load(os.path.join(results_dir, f"bench_throughput_{tag}_{model}_{which}.json"))]
            pattern = os.path.join(results_dir, f"bench_throughput_{tag}_{model}_{which}_r*.json")
            runs += [_load(p) for p in sorted(glob.glob(pattern))]
            tok_s = [r["results"]["kiln"]["total_tokens_per_s"] for r in runs if r]
            if tok_s:
                row[f"tok_s_{which}"] = statistics.median(tok_s)
                row[f"tok_s_runs_{which}"] = tok_s
        out.append(row)
    return out


def _cell(row: dict, key: str, which: str) -> str:
    v = row.get(f"{key}_{which}")
    return "-" if v is None else f"{v:.3f}" if key == "tpot_ms" else f"{v:,.0f}"


def _change(row: dict, key: str) -> str:
    a, b = row.get(f"{key}_base"), row.get(f"{key}_new")
    return "-" if not a or b is None else f"{(b / a - 1) * 100:+.1f}%"


def main() -> None:
    results_dir, tag = sys.argv[1], sys.argv[2]
    table = rows(results_dir, tag)
    print("| model | TPOT b1 before (ms) | after | change | tok/s before | after | change |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['model']} | {_cell(r, 'tpot_ms', 'base')} | {_cell(r, 'tpot_ms', 'new')} "
            f"| {_change(r, 'tpot_ms')} | {_cell(r, 'tok_s', 'base')} | {_cell(r, 'tok_s', 'new')} "
            f"| {_change(r, 'tok_s')} |"
        )
    with open(os.path.join(results_dir, f"compare_{tag}.json"), "w") as f:
        json.dump(table, f, indent=2)


if __name__ == "__main__":
    main()
