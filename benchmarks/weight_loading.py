"""Weight loading from the page cache: kiln's loader against a plain ``safetensors`` load.

    python benchmarks/weight_loading.py make DIR [--shape llama-8b] [--layers N] [--tokenizer TOK]
                                                     # random bf16 checkpoint (with TOK's tokenizer files)
    python benchmarks/weight_loading.py load DIR [--device cuda] [--threads N] [--repeat 3] [--out OUT.json]

``load`` reads the files once (so they sit in the page cache), then times, in this process: kiln's
``build_model`` (allocation and the copy into the fused parameters) and ``safetensors.torch.load_file``
onto the same device (the baseline of one plain copy). It prints GB/s of checkpoint bytes and the peak
resident memory of the process. Run it with ``PYTHONPATH`` on another tree to compare loaders.
"""

import argparse
import glob
import json
import os
import resource
import statistics
import sys
import time


def make(args) -> None:
    import torch
    from safetensors.torch import save_file

    from kiln.bench.shapes import shape_config

    config = shape_config(args.shape)
    config.update(num_hidden_layers=args.layers or config["num_hidden_layers"], torch_dtype="bfloat16")
    os.makedirs(args.dir, exist_ok=True)
    with open(os.path.join(args.dir, "config.json"), "w") as f:
        json.dump(config, f)
    h, inter, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv = (
        config["num_attention_heads"],
        config.get("num_key_value_heads") or config["num_attention_heads"],
    )
    d = config.get("head_dim") or h // heads
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": rand(h)}
    if not config.get("tie_word_embeddings"):
        tensors["lm_head.weight"] = rand(v, h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update(
            {
                p + "self_attn.q_proj.weight": rand(heads * d, h),
                p + "self_attn.k_proj.weight": rand(kv * d, h),
                p + "self_attn.v_proj.weight": rand(kv * d, h),
                p + "self_attn.o_proj.weight": rand(h, heads * d),
                p + "mlp.gate_proj.weight": rand(inter, h),
                p + "mlp.up_proj.weight": rand(inter, h),
                p + "mlp.down_proj.weight": rand(h, inter),
                p + "input_layernorm.weight": rand(h),
                p + "post_attention_layernorm.weight": rand(h),
            }
        )
    save_file(tensors, os.path.join(args.dir, "model.safetensors"))
    if args.tokenizer:  # a start-up then loads a tokenizer too, as it does from a real checkpoint
        import shutil

        for name in os.listdir(args.tokenizer):
            if os.path.isfile(src := os.path.join(args.tokenizer, name)) and name != "config.json":
                shutil.copy(src, os.path.join(args.dir, name))
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"wrote {size / 1e9:.2f} GB to {args.dir}")


def load(args) -> dict:
    import torch
    from safetensors.torch import load_file

    from kiln.models.config import ModelConfig
    from kiln.models.loader import build_model, read_config

    files = sorted(glob.glob(os.path.join(args.dir, "*.safetensors")))
    size = sum(os.path.getsize(f) for f in files)
    for f in files:  # into the page cache
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    mc = ModelConfig.from_dict(read_config(args.dir))
    if args.threads is not None:
        import kiln.models.weight_copy as weight_copy

        weight_copy.DEFAULT_THREADS = args.threads
    kiln_s, plain_s = [], []
    for _ in range(args.repeat):
        sync()
        t = time.perf_counter()
        model = build_model(args.dir, mc, torch.bfloat16, device)
        sync()
        kiln_s.append(time.perf_counter() - t)
        del model
        t = time.perf_counter()
        state = {}
        for f in files:
            state.update(load_file(f, device=str(device)))
        sync()
        plain_s.append(time.perf_counter() - t)
        del state
    kiln_med, plain_med = statistics.median(kiln_s), statistics.median(plain_s)
    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "kiln_tree": os.path.dirname(os.path.dirname(os.path.abspath(sys.modules["kiln"].__file__))),
        "device": str(device),
        "checkpoint_gb": size / 1e9,
        "threads": args.threads,
        "kiln_build_model_s": kiln_s,
        "safetensors_load_file_s": plain_s,
        "kiln_gb_per_s": size / 1e9 / kiln_med,
        "safetensors_gb_per_s": size / 1e9 / plain_med,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("dir")
    m.add_argument("--shape", default="llama-1b")
    m.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    m.add_argument("--tokenizer", default=None, help="a tokenizer folder whose files go into DIR")
    q = sub.add_parser("load")
    q.add_argument("dir")
    q.add_argument("--device", default="cpu")
    q.add_argument("--threads", type=int, default=None, help="copy threads (default: kiln's)")
    q.add_argument("--repeat", type=int, default=3)
    q.add_argument("--out", default=None)
    args = p.parse_args()
    if args.cmd == "make":
        make(args)
        return
    result = load(args)
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
