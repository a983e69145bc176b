"""Read a GGUF file: config through transformers, tensors dequantised one at a time with HF names.

transformers parses the whole metadata (the vocabulary included) to build a GGUF file's config: seconds at
every start. With a cache root the config dict is kept in ``<root>/gguf/<key>/config.json``, the key being
the file (real path, size, modification time) and the transformers version (``cache_key``); the converted
tokenizer sits beside it (``kiln/runtime/gguf_tokenizer.py``).
"""

import hashlib
import json
import os
import re
from collections.abc import Iterator

import torch

from kiln.files import write_text_atomic

_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _require_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("Loading .gguf files needs the 'gguf' package: pip install 'kiln[gguf]'") from e
    return gguf


def cache_key(path: str) -> str:
    import transformers

    real = os.path.realpath(path)
    st = os.stat(real)
    ident = f"{real}\0{st.st_size}\0{st.st_mtime_ns}\0{transformers.__version__}"
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def cache_entry(root: str, path: str) -> str:
    """Where a GGUF file's parsed config and converted tokenizer are kept under the cache ``root``."""
    return os.path.join(root, "gguf", cache_key(path))


def gguf_config(path: str, cache_root: str | None = None) -> dict:
    """The HF-style config dict of a GGUF file (transformers parses the metadata), kept under
    ``cache_root`` when given and read from there by later starts."""
    saved = os.path.join(cache_entry(cache_root, path), "config.json") if cache_root is not None else None
    if saved is not None and os.path.isfile(saved):
        try:
            with open(saved) as f:
                return json.load(f)
        except (OSError, ValueError):  # a damaged entry: parse the file again
            pass
    cfg = _parse_config(path)
    if saved is not None:
        try:
            os.makedirs(os.path.dirname(saved), exist_ok=True)
            write_text_atomic(saved, json.dumps(cfg))
        except OSError:  # a cache that cannot be written is left alone
            pass
    return cfg


def _parse_config(path: str) -> dict:
    _require_gguf()
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(
            os.path.dirname(path) or ".", gguf_file=os.path.basename(path)
        ).to_dict()
    except Exception as e:
        raise ValueError(
            f"model: GGUF file {path!r} is damaged or incomplete ({type(e).__name__}: {e})"
        ) from e
    if not cfg.get("architectures"):
        arch = _MODEL_TYPES.get(cfg.get("model_type"))
        cfg["architectures"] = [arch] if arch else [f"<gguf model_type {cfg.get('model_type')}>"]
    return json.loads(json.dumps(cfg))  # as a config.json reads (label ids as strings), cached or not


def hf_name(gguf_name: str) -> str | None:
    """Map a llama.cpp tensor name to its HF checkpoint name (None for tensors kiln does not use)."""
    base, _, suffix = gguf_name.rpartition(".")
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{suffix}"
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    return None


def _unpermute(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's interleaved-rope row order of q/k projections (llama architecture only)."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def iter_gguf_tensors(path: str, cfg: dict) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Yield ``(hf_name, float32 tensor, path)`` one tensor at a time."""
    gguf = _require_gguf()
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise ValueError(
            f"model: GGUF file {path!r} is damaged or incomplete ({type(e).__name__}: {e})"
        ) from e
    interleaved = cfg.get("model_type") in ("llama", "mistral")
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg.get("num_key_value_heads")}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            continue
        weight = torch.from_numpy(gguf.dequantize(tensor.data, tensor.tensor_type).copy())
        proj = name.split(".")[-2]
        if interleaved and proj in heads:
            weight = _unpermute(weight, heads[proj] or cfg["num_attention_heads"])
        yield name, weight, path
