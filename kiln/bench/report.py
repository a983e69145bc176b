"""``kiln bench report``: markdown tables summarising the ``bench_*.json`` files of a results directory
(the tables of benchmarks/README.md are made with it)."""

from __future__ import annotations

import argparse
import glob
import json
import os


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results-dir", default="benchmarks/results", help="directory of bench_*.json files")
    p.add_argument("--output", default=None, help="write the markdown here (default: print it)")


def _load(results_dir: str, kind: str) -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(glob.glob(os.path.join(results_dir, f"bench_{kind}*.json"))):
        with open(path) as f:
            doc = json.load(f)
        if doc.get("benchmark") == kind:
            docs.append((os.path.basename(path), doc))
    return docs


def _f(x, digits=1, scale=1.0) -> str:
    return "–" if x is None else f"{x * scale:,.{digits}f}"


def _device(doc: dict) -> str:
    m = doc.get("machine", {})
    return m.get("gpu_name") or f"CPU ({m.get('cpu_count')} cores)"


def _hf(results: dict, variant: str) -> dict | None:
    return next((r for r in results.get("hf", []) if r.get("variant") == variant and "error" not in r), None)


def throughput_table(docs) -> str:
    head = [
        "file",
        "device",
        "model",
        "requests",
        "in/out",
        "kiln req/s",
        "kiln total tok/s",
        "kiln output tok/s",
        "peak mem GiB",
        "HF eager tok/s",
        "HF static+compile tok/s",
        "kiln/HF eager",
        "kiln/HF compile",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, doc in docs:
        r, wl = doc["results"], doc["config"].get("workload", {})
        k = r["kiln"]
        eager, comp = _hf(r, "eager"), _hf(r, "static-compile")
        ratio = r.get("ratio_kiln_over_hf", {})
        io = (
            f"{wl.get('input_len', '?')}/{wl.get('output_len', '?')}"
            if wl.get("kind") == "synthetic"
            else "file"
        )
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    _device(doc),
                    doc["config"]["model"]["spec"],
                    str(k["num_requests"]),
                    io,
                    _f(k["requests_per_s"], 2),
                    _f(k["total_tokens_per_s"]),
                    _f(k["output_tokens_per_s"]),
                    _f(k["memory"]["peak_bytes"], 2, 1 / 2**30),
                    _f(eager and eager["total_tokens_per_s"]),
                    _f(comp and comp["total_tokens_per_s"]),
                    _f(ratio.get("eager"), 2) + ("x" if "eager" in ratio else ""),
                    _f(ratio.get("static-compile"), 2) + ("x" if "static-compile" in ratio else ""),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def latency_table(docs) -> str:
    head = [
        "file",
        "device",
        "model",
        "batch",
        "kiln TTFT ms",
        "kiln TPOT ms (p50 / p99)",
        "kiln e2e ms",
        "HF eager TPOT ms",
        "HF static+compile TPOT ms",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, doc in docs:
        r = doc["results"]
        hf = {
            v["variant"]: {b["batch_size"]: b for b in v.get("batches", []) if "error" not in b}
            for v in r.get("hf", [])
        }
        for row in r["kiln"]["batches"]:
            bs = row["batch_size"]
            he = hf.get("eager", {}).get(bs)
            hc = hf.get("static-compile", {}).get(bs)
            tpot = row["tpot_s"]
            lines.append(
                "| "
                + " | ".join(
                    [
                        name,
                        _device(doc),
                        doc["config"]["model"]["spec"],
                        str(bs),
                        _f(row["ttft_s"]["mean"], 2, 1000),
                        "{} ({} / {})".format(*(_f(tpot[k], 2, 1000) for k in ("mean", "p50", "p99"))),
                        _f(row["e2e_s"]["mean"], 1, 1000),
                        _f(he and he["tpot_s"]["mean"], 2, 1000),
                        _f(hc and hc["tpot_s"]["mean"], 2, 1000),
                    ]
                )
                + " |"
            )
    return "\n".join(lines) + "\n"


def startup_table(docs) -> str:
    stages = ("dynamo", "passes", "inductor", "cache_load", "graph_capture")
    head = [
        "file",
        "device",
        "model",
        "start",
        "import s",
        "LLM() s",
        *[f"{s} s" for s in stages],
        "first request extra s",
        "ready s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, doc in docs:
        for phase, r in doc["results"]["phases"].items():
            if "error" in r:
                cells = [
                    name,
                    _device(doc),
                    doc["config"]["model"]["spec"],
                    phase,
                    "failed: " + r["error"][:80],
                ]
                cells += ["–"] * (len(head) - len(cells))
            else:
                st = r.get("stages_s") or {}
                cells = [
                    name,
                    _device(doc),
                    doc["config"]["model"]["spec"],
                    phase,
                    _f(r["import_s"], 2),
                    _f(r["startup_s"], 2),
                    *[_f(st.get(s), 2) for s in stages],
                    _f(r["first_request_overhead_s"], 2),
                    _f(r["ready_s"], 2),
                ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render(results_dir: str) -> str:
    parts = []
    for title, kind, fn in (
        ("Throughput", "throughput", throughput_table),
        ("Latency", "latency", latency_table),
        ("Start-up", "compile", startup_table),
    ):
        docs = _load(results_dir, kind)
        if docs:
            parts.append(f"### {title}\n\n" + fn(docs))
    for path in sorted(glob.glob(os.path.join(results_dir, "bench_sweep*.md"))):
        with open(path) as f:
            text = f.read()
        parts.append(f"### Sweep ({os.path.basename(path)})\n\n" + text.split("\n", 2)[-1].lstrip())
    return "\n".join(parts) if parts else f"no bench_*.json in {results_dir}\n"


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    text = render(args.results_dir)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"wrote {args.output}")
    else:
        print(text)
    return {"markdown": text}
