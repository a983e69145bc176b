"""Embedding throughput: kiln's pooling runner vs HF transformers' batched forward, same run.

For each model shape (random weights; kiln loads them with ``load_format="dummy"``, HF builds its
``AutoModel`` from the same config), N random-token prompts of fixed length are embedded: kiln with
``LLM(runner="pooling").embed`` (last-token pooling, normalised; the default compile and CUDA graphs on
GPU), HF with ``AutoModel`` forwards over batches of ``--hf-batch-size`` prompts, the last hidden
state pooled and normalised the same way, each batch's embeddings brought to the host as Python
lists, as ``embed`` returns them.
Both are timed after a warm-up; tokens/s counts prompt tokens. Each side's model TFLOP/s (the forward's
matrix products, ``kiln.bench.limits.forward_flops``) is set against a large bf16 GEMM timed in the same
run: ``kiln_over_hf_bound`` is the ratio an engine at that GEMM rate would reach over HF. Results JSON:
machine (GPU name, driver), versions, command, configuration and per model kiln/HF tokens/s, TFLOP/s and
their ratio.

    python benchmarks/pooling.py --models llama-1b,llama-8b --output benchmarks/results/pooling_h200.json
    python benchmarks/pooling.py --models tiny --num-prompts 16 --input-len 16   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kiln.bench import env  # noqa: E402
from kiln.bench.common import free_llm, jsonable, sync  # noqa: E402
from kiln.bench.limits import forward_flops, gemm_tflops  # noqa: E402
from kiln.bench.shapes import shape_config, write_shape_dir  # noqa: E402


def random_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (num, length), generator=gen).tolist()


def run_kiln(path: str, prompts: list[list[int]], args) -> dict:
    from kiln import LLM

    kwargs = dict(
        runner="pooling",
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype=args.dtype,
        max_model_len=max(len(p) for p in prompts) + 16,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
    )
    sync()
    t0 = time.perf_counter()
    llm = LLM(path, **kwargs)
    sync()
    startup = time.perf_counter() - t0
    try:
        llm.embed(prompts[: args.num_warmup], use_tqdm=False)
        llm.reset_prefix_cache()  # random prompts share no prefix anyway; start from an empty cache
        sync()
        t0 = time.perf_counter()
        outputs = llm.embed(prompts, use_tqdm=not args.no_progress)
        sync()
        elapsed = time.perf_counter() - t0
        dim = outputs[0].outputs.hidden_size
    finally:
        free_llm(llm)
    tokens = sum(len(p) for p in prompts)
    return {
        "llm_kwargs": kwargs,
        "startup_s": startup,
        "elapsed_s": elapsed,
        "prompt_tokens": tokens,
        "tokens_per_s": tokens / elapsed,
        "prompts_per_s": len(prompts) / elapsed,
        "embedding_dim": dim,
    }


@torch.inference_mode()
def run_hf(config: dict, prompts: list[list[int]], args, device: torch.device, dtype: torch.dtype) -> dict:
    from transformers import AutoConfig, AutoModel

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    for key in ("torch_dtype", "dtype", "architectures"):
        cfg.pop(key, None)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModel.from_config(AutoConfig.for_model(model_type, **cfg), dtype=dtype).eval()
    batch = args.hf_batch_size

    def embed(chunk):
        ids = torch.tensor(chunk, device=device)  # equal lengths: no padding, no mask needed
        hidden = model(input_ids=ids, use_cache=False).last_hidden_state[:, -1]
        return F.normalize(hidden.float(), dim=-1).cpu().tolist()  # lists, as embed() returns

    try:
        embed(prompts[: min(batch, len(prompts))])
        sync()
        t0 = time.perf_counter()
        for i in range(0, len(prompts), batch):
            embed(prompts[i : i + batch])
        sync()
        elapsed = time.perf_counter() - t0
    finally:
        model = None  # noqa: F841  (frees the weights before the next model)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    tokens = sum(len(p) for p in prompts)
    return {
        "batch_size": batch,
        "attn_implementation": "sdpa (default)",
        "elapsed_s": elapsed,
        "prompt_tokens": tokens,
        "tokens_per_s": tokens / elapsed,
        "prompts_per_s": len(prompts) / elapsed,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="llama-1b,llama-8b", help="comma list of kiln.bench shapes")
    p.add_argument("--num-prompts", type=int, default=10000)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--num-warmup", type=int, default=64)
    p.add_argument("--no-hf", action="store_true", help="kiln only")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the results JSON here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    gemm = gemm_tflops(device, dtype, n=8192 if device.type == "cuda" else 256)
    print(f"dense {args.dtype if device.type == 'cuda' else 'float32'} GEMM: {gemm:,.1f} TFLOP/s", flush=True)
    results = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        config = shape_config(name)
        prompts = random_prompts(args.num_prompts, args.input_len, config["vocab_size"], args.seed)
        flops = forward_flops(config, args.input_len, args.num_prompts)
        row = {"kiln": run_kiln(write_shape_dir(name), prompts, args), "forward_flops": flops}
        row["kiln"]["tflops"] = flops / row["kiln"]["elapsed_s"] / 1e12
        if not args.no_hf:
            row["hf"] = run_hf(config, prompts, args, device, dtype)
            row["hf"]["tflops"] = flops / row["hf"]["elapsed_s"] / 1e12
            row["kiln_over_hf"] = row["kiln"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
            row["kiln_over_hf_bound"] = gemm / row["hf"]["tflops"]
        results[name] = row
        hf = ""
        if "hf" in row:
            hf = (
                f", HF batch {args.hf_batch_size} {row['hf']['tokens_per_s']:,.0f} tok/s"
                f" ({row['hf']['tflops']:,.1f} TFLOP/s), kiln/HF {row['kiln_over_hf']:.2f}x"
                f" (at most {row['kiln_over_hf_bound']:.2f}x at the GEMM rate)"
            )
        kiln = row["kiln"]
        print(
            f"{name}: kiln {kiln['tokens_per_s']:,.0f} tok/s ({kiln['tflops']:,.1f} TFLOP/s){hf}", flush=True
        )
    doc = env.collect([sys.argv[0], *(argv if argv is not None else sys.argv[1:])], jsonable(vars(args)))
    doc["benchmark"] = "pooling"
    doc["gemm_tflops"] = gemm
    doc["results"] = results
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(jsonable(doc), f, indent=2)
            f.write("\n")
    return doc


if __name__ == "__main__":
    main()
