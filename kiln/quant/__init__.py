"""FP8 quantization: fp8 projections (``Fp8Linear``), FP8 checkpoints and the fp8 KV cache."""

from kiln.quant.config import SUPPORTED_METHODS, QuantConfig, resolve_quantization
from kiln.quant.linear import Fp8Linear

__all__ = ["SUPPORTED_METHODS", "Fp8Linear", "QuantConfig", "resolve_quantization"]
