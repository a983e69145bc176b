"""Put ``Fp8Linear`` in place of the decoder layers' projections, and map FP8 checkpoint tensors.

The model code keeps its ``nn.Linear`` projections (``qkv_proj``, ``o_proj``, ``gate_up_proj``,
``down_proj``); quantization swaps the modules after the model is built:

- quantizing at load (``quantize_model``): once the unquantized weights are loaded, each projection
  becomes an ``Fp8Linear`` holding its per-output-channel quantized weight;
- pre-quantized checkpoints (``prepare_model`` before loading, ``checkpoint_tensors`` while loading,
  ``finish_model`` after): empty ``Fp8Linear`` modules receive the stored fp8 weights, and each
  ``weight_scale`` / ``input_scale`` is checked against its layer and spread over the rows it scales.

The logits projection and embeddings stay in the model dtype.
"""

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from kiln.quant.config import QuantConfig
from kiln.quant.fp8 import FP8_DTYPE
from kiln.quant.linear import Fp8Linear

# kiln projection -> the checkpoint modules fused into it, in shard order
PROJECTIONS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


def _projections(model: nn.Module, quant: QuantConfig) -> Iterator[tuple[str, nn.Module, list[str]]]:
    """(kiln module name, module, checkpoint module names) of each projection to quantize."""
    for i, layer in enumerate(model.model.layers):
        for suffix, parts in PROJECTIONS.items():
            prefix = f"model.layers.{i}."
            ckpt = [prefix + p for p in parts]
            ignored = [quant.is_ignored(c) for c in ckpt]
            if all(ignored):
                continue
            if any(ignored):
                raise ValueError(
                    f"quantization ignore list: {[c for c, x in zip(ckpt, ignored) if x]} are ignored but "
                    f"{[c for c, x in zip(ckpt, ignored) if not x]} are not; kiln fuses them into one layer "
                    f"({prefix + suffix})"
                )
            yield prefix + suffix, layer.get_submodule(suffix), ckpt


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def quantize_model(model: nn.Module, quant: QuantConfig) -> None:
    """Quantize the loaded projections in place, one layer at a time (peak memory: one layer)."""
    for name, linear, _ in list(_projections(model, quant)):
        _replace(model, name, Fp8Linear.from_linear(linear))
        del linear


def prepare_model(model: nn.Module, quant: QuantConfig, dtype: torch.dtype) -> None:
    """Swap in empty ``Fp8Linear`` modules (on the meta device) for a pre-quantized checkpoint."""
    for name, linear, _ in list(_projections(model, quant)):
        module = Fp8Linear(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            static_input_scale=quant.static_activations,
            dtype=dtype,
            device="meta",
        )
        _replace(model, name, module)


def finish_model(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.finish_loading()


def checkpoint_tensors(
    weights: Iterable[tuple[str, torch.Tensor, str]], model: nn.Module, quant: QuantConfig
) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Check and reshape the fp8 tensors of a pre-quantized checkpoint on their way to the model.

    Quantized layers' ``weight`` must be float8_e4m3fn; ``weight_scale`` one value (per tensor) or one
    per output row; ``input_scale`` one value, only with static activations. Each scale comes out as
    one fp32 value per output row of its checkpoint layer, so fused layers take them like weights.
    Anything wrong raises ValueError naming the tensor."""
    rows = {}
    for name, _, ckpt in _projections(model, quant):
        fused = model.get_parameter(name + ".weight")
        for shard, ckpt_name in enumerate(ckpt):
            if len(ckpt) == 1:
                rows[ckpt_name] = fused.shape[0]
            else:
                lo, hi = model._shard_range(name + ".weight", shard)
                rows[ckpt_name] = hi - lo
    for name, tensor, source in weights:
        module_name, _, leaf = name.rpartition(".")
        n = rows.get(module_name)
        if n is None:
            yield name, tensor, source
            continue
        if leaf == "weight":
            if tensor.dtype != FP8_DTYPE:
                raise ValueError(
                    f"{source}: tensor {name!r} is {tensor.dtype}, expected float8_e4m3fn "
                    f"(the checkpoint's quantization_config says this layer is quantized)"
                )
            yield name, tensor, source
        elif leaf == "weight_scale":
            yield name, _weight_scale(name, tensor, n, quant.weight_strategy, source), source
        elif leaf == "input_scale":
            if not quant.static_activations:
                raise ValueError(
                    f"{source}: unexpected tensor {name!r}: the quantization_config has dynamic activations"
                )
            if tensor.numel() != 1:
                raise ValueError(
                    f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, expected one value "
                    "(a per-tensor activation scale)"
                )
            yield name, _positive(name, tensor, source).reshape(1).expand(n).clone(), source
        else:
            yield name, tensor, source


def _weight_scale(name, tensor, rows, strategy, source) -> torch.Tensor:
    per_tensor = tensor.numel() == 1 and tensor.dim() <= 1
    per_channel = tuple(tensor.shape) in ((rows,), (rows, 1))
    allowed = {"tensor": per_tensor, "channel": per_channel, None: per_tensor or per_channel}[strategy]
    if not allowed:
        shapes = {"tensor": "() or (1,)", "channel": f"({rows},) or ({rows}, 1)", None: None}
        expected = shapes[strategy] or f"() or (1,) per tensor, ({rows},) or ({rows}, 1) per channel"
        raise ValueError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected}")
    tensor = _positive(name, tensor, source)
    return tensor.reshape(-1).expand(rows).clone() if per_tensor else tensor.reshape(rows)


def _positive(name, tensor, source) -> torch.Tensor:
    tensor = tensor.float()
    if not bool(torch.isfinite(tensor).all()) or bool((tensor <= 0).any()):
        raise ValueError(f"{source}: tensor {name!r} holds scales that are not finite and positive")
    return tensor
