"""``kv_cache_dtype``: the KV cache's element type and each layer's fp8 scales, decided in one place.

``"auto"`` keeps the model dtype. ``"fp8"`` / ``"fp8_e4m3"`` store K and V as float8_e4m3fn: the store
writes ``K / k_scale`` and ``V / v_scale`` (saturated at +-448) and the attention kernels multiply back.
The scales are per layer; kiln uses 1.0 for every layer (bf16 checkpoints carry no calibrated KV
scales), which keeps K/V of magnitude up to 448 representable with fp8's 3-bit mantissa.
"""

import torch
from torch import nn

from kiln.quant.fp8 import FP8_DTYPE, check_device_supports_fp8

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
DEFAULT_KV_SCALE = 1.0


def check_kv_cache_dtype(value, device: torch.device) -> str:
    """Validate ``LLM(kv_cache_dtype=...)`` before anything is built."""
    if value not in KV_CACHE_DTYPES:
        raise ValueError(
            f"kv_cache_dtype: unsupported value {value!r}; kiln supports "
            f"{', '.join(repr(v) for v in KV_CACHE_DTYPES)}"
        )
    if value != "auto":
        check_device_supports_fp8(device, f"kv_cache_dtype={value!r}")
    return value


def configure_kv_cache(model: nn.Module, kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache dtype for ``kv_cache_dtype``; sets each attention layer's ``k_scale`` / ``v_scale``."""
    if kv_cache_dtype == "auto":
        return model_dtype
    for layer in model.model.layers:
        layer.self_attn.k_scale = layer.self_attn.v_scale = DEFAULT_KV_SCALE
    return FP8_DTYPE
