"""Random LoRA adapters in PEFT's on-disk format, written without building the base model (for
benchmarks on named shapes with dummy weights)."""

from __future__ import annotations

import json
import os

import torch

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _module_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """HF module -> (in features, out features) of one decoder layer of an HF config dict."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv = (
        config["num_attention_heads"],
        config.get("num_key_value_heads", config["num_attention_heads"]),
    )
    head_dim = config.get("head_dim") or hidden // heads
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv * head_dim),
        "v_proj": (hidden, kv * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def write_random_adapter(
    directory: str,
    config: dict,
    rank: int = 16,
    alpha: float = 32.0,
    targets: tuple[str, ...] = SEVEN,
    seed: int = 0,
    std: float = 0.01,
) -> str:
    """``adapter_config.json`` + ``adapter_model.safetensors`` as peft's ``save_pretrained`` writes them."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    shapes = _module_shapes(config)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module in targets:
            parent = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            fan_in, fan_out = shapes[module]
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen) * std).to(
                torch.bfloat16
            )
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen) * std).to(
                torch.bfloat16
            )
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "bias": "none",
        "use_rslora": False,
        "modules_to_save": None,
    }
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f, indent=1)
    return directory
