"""Named model shapes (HF ``config.json`` dicts) for speed measurements with random weights.

A shape becomes a model directory holding only ``config.json``; kiln loads it with
``load_format="dummy"`` and token-id prompts, so no weights or tokenizer are needed.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

SHAPES: dict[str, dict] = {
    # Llama-3.2-1B
    "llama-1b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": dict(_LLAMA3_ROPE, factor=32.0),
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "torch_dtype": "bfloat16",
    },
    # Llama-3.1-8B
    "llama-8b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": dict(_LLAMA3_ROPE, factor=8.0),
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "torch_dtype": "bfloat16",
    },
    # Qwen3-0.6B
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "torch_dtype": "bfloat16",
    },
    # a few-hundred-kilobyte Llama for CPU smoke tests
    "tiny": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    },
}


def shape_config(name: str) -> dict:
    """A copy of the named shape's HF config dict."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known shapes: {', '.join(SHAPES)}")
    return copy.deepcopy(SHAPES[name])


@dataclass
class ModelSource:
    """Where a benchmark's model comes from.

    Attributes:
        spec: What the user asked for (a shape name or a path).
        path: A directory (or ``.gguf`` file) kiln can load.
        config: The HF config dict.
        shape: The shape name, or ``None`` for a real model directory.
        load_format: ``"dummy"`` for shapes, else what the user asked for.
    """

    spec: str
    path: str
    config: dict
    shape: str | None
    load_format: str

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def has_tokenizer(self) -> bool:
        return (
            self.shape is None
            and os.path.isdir(self.path)
            and any(
                os.path.isfile(os.path.join(self.path, f))
                for f in ("tokenizer.json", "tokenizer_config.json")
            )
        )

    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "path": self.path,
            "shape": self.shape,
            "load_format": self.load_format,
            "config": self.config,
        }


def write_shape_dir(name: str, directory: str | None = None) -> str:
    """Write ``config.json`` of the named shape into ``directory`` (a new temp dir by default)."""
    config = shape_config(name)
    directory = directory or tempfile.mkdtemp(prefix=f"kiln-shape-{name}-")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return directory


def resolve_model(spec: str, load_format: str = "auto", directory: str | None = None) -> ModelSource:
    """A shape name becomes a temp config-only directory loaded with dummy weights; anything else is
    resolved like ``LLM(model=...)`` does (a local directory, a ``.gguf`` file or a hub id, downloaded
    when not cached)."""
    if spec in SHAPES:
        path = write_shape_dir(spec, directory)
        return ModelSource(spec, path, shape_config(spec), spec, "dummy")
    from kiln.models.hub import resolve_model_path
    from kiln.models.loader import read_config

    path = resolve_model_path(spec)
    return ModelSource(spec, path, read_config(path), None, load_format)
