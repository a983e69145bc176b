"""An independent fp8 emulation in HF transformers (the oracle of kiln's fp8 paths), FP8 checkpoint
writers in the layouts of HF/vLLM ``quant_method: "fp8"`` and compressed-tensors, and a kiln forward.

Emulation: every projection of every decoder layer (q, k, v, o, gate, up, down) rounds its weight to
float8_e4m3fn with a per-output-channel scale (or the checkpoint's per-tensor one) and its input to
float8_e4m3fn per token (or with the static per-tensor scale), then multiplies the dequantized values
in fp32. Written from the formats' definitions, not from kiln's code.
"""

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file
from torch import nn

E4M3 = torch.float8_e4m3fn
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
PROJ += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def round_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Dequantized fp8 value of ``x`` at ``scale`` (saturating)."""
    return (x / scale).clamp(-448.0, 448.0).to(E4M3).float() * scale


class EmulatedFp8Linear(nn.Module):
    def __init__(self, weight, weight_scale, bias=None, input_scale=None):
        super().__init__()
        self.weight = round_e4m3(weight.float(), weight_scale)  # weight_scale [out, 1] or [1, 1]
        self.bias = None if bias is None else bias.float()
        self.input_scale = input_scale

    def forward(self, x):
        x = x.float()
        if self.input_scale is None:
            scale = x.abs().amax(-1, keepdim=True) / 448.0
        else:
            scale = self.input_scale
        out = round_e4m3(x, scale) @ self.weight.t()
        return out if self.bias is None else out + self.bias


def per_channel_scale(weight: torch.Tensor) -> torch.Tensor:
    return weight.float().abs().amax(1, keepdim=True) / 448.0


def hf_fp8_model(path: str, weight_scales=None, input_scales=None):
    """The HF model of ``path`` (fp32) with every decoder projection emulated in fp8.

    ``weight_scales`` / ``input_scales``: ``{checkpoint module name: scale}`` overrides (per-tensor
    checkpoint scales, static activation scales); the default is per-channel weights, per-token inputs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for i, layer in enumerate(model.model.layers):
        for name in PROJ:
            full = f"model.layers.{i}.{name}"
            lin = layer.get_submodule(name)
            w_scale = (weight_scales or {}).get(full)
            if w_scale is None:
                w_scale = per_channel_scale(lin.weight.data)
            emulated = EmulatedFp8Linear(lin.weight.data, w_scale, lin.bias, (input_scales or {}).get(full))
            parent, leaf = name.split(".")
            setattr(layer.get_submodule(parent), leaf, emulated)
    return model


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()


@torch.no_grad()
def kiln_logits(model, ids: list[int], kv_dtype=None) -> torch.Tensor:
    """Logits of every position of one prompt through a kiln model, torch attention backend."""
    from kiln.ops.forward_context import forward_context
    from kiln.ops.metadata import AttentionMetadata

    cfg = model.config
    n, block = len(ids), 16
    dtype = kv_dtype or next(model.model.norm.parameters()).dtype
    caches = [
        torch.zeros(2, -(-n // block), block, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)
        for _ in range(cfg.num_layers)
    ]
    md = AttentionMetadata.single_sequence(n, block, "cpu")
    with forward_context(md, caches, "torch"):
        hidden = model(torch.tensor(ids), torch.arange(n))
    return model.compute_logits(hidden).float()


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def write_fp8_checkpoint(src: str, dst: str, fmt: str, per_channel: bool, static_inputs=None) -> dict:
    """Quantize ``src``'s projections and save them as an FP8 checkpoint in ``dst``.

    ``fmt``: "fp8" (HF / vLLM quant_method "fp8": ``weight_scale`` one value per tensor unless
    ``per_channel``, ``input_scale`` one value with ``activation_scheme: "static"``) or
    "compressed-tensors" (its FP8 or FP8_DYNAMIC presets: ``weight_scale`` ``[]``/``[1]`` per tensor,
    ``[out, 1]`` per channel). ``static_inputs``: ``{module: scale}`` to store as ``input_scale``.
    Returns ``{module: weight scale}`` as stored."""
    shutil.copytree(src, dst)
    files = [f for f in os.listdir(dst) if f.endswith(".safetensors")]
    scales = {}
    for file in files:
        tensors = load_file(os.path.join(dst, file))
        out = {}
        for name, t in tensors.items():
            module = name.rsplit(".", 1)[0]
            if name.endswith(".weight") and module.split(".", 3)[-1] in PROJ:
                scale = per_channel_scale(t) if per_channel else t.float().abs().amax().reshape(1, 1) / 448.0
                out[name] = (t.float() / scale).clamp(-448, 448).to(E4M3)
                if per_channel:
                    stored = scale if fmt == "compressed-tensors" else scale.reshape(-1)
                else:
                    stored = scale.reshape(()) if fmt == "fp8" else scale.reshape(1)
                out[module + ".weight_scale"] = stored.contiguous()
                scales[module] = scale
                if static_inputs is not None:
                    out[module + ".input_scale"] = torch.tensor([static_inputs[module]])
            else:
                out[name] = t
        save_file(out, os.path.join(dst, file), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = _quant_config(fmt, per_channel, static_inputs is not None)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return scales


def _quant_config(fmt: str, per_channel: bool, static: bool) -> dict:
    if fmt == "fp8":
        return {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic"}
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    weights = QuantizationArgs(num_bits=8, type="float", strategy="channel" if per_channel else "tensor")
    if static:
        inputs = QuantizationArgs(num_bits=8, type="float", strategy="tensor")
    else:
        inputs = QuantizationArgs(num_bits=8, type="float", strategy="token", dynamic=True)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)
    qc = QuantizationConfig(
        config_groups={"group_0": scheme},
        ignore=["lm_head"],
        format="float-quantized",
        quantization_status="compressed",
    )
    return json.loads(qc.model_dump_json())
