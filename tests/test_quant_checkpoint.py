"""Pre-quantized FP8 checkpoints: HF / vLLM ``quant_method: "fp8"`` and compressed-tensors
``float-quantized``, per-tensor and per-channel weight scales, static and dynamic activation scales.

The tests quantize a tiny random model themselves and save it the way those formats do; kiln's logits
must match the HF fp8 emulation (``tests/fp8_oracle.py``) with the same stored scales within 1e-3.
With static scales kiln quantizes a fused layer's input (q/k/v, gate/up) with the largest of its
parts' ``input_scale``, so the emulation does the same.
"""

import json
import os

import pytest
import torch
from fp8_oracle import PROJ, hf_fp8_model, hf_logits, kiln_logits, rel_error, write_fp8_checkpoint
from safetensors.torch import load_file, save_file

from kiln import LLM, SamplingParams
from kiln.models.config import ModelConfig
from kiln.models.loader import build_model, read_config
from kiln.quant import Fp8Linear, resolve_quantization

CPU = torch.device("cpu")
IDS = [1, 504, 3458, 282, 4649, 314, 253, 1345, 338, 553, 2056, 28, 1488, 2994, 30]
FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def load(path, quantization=None):
    cfg = ModelConfig.from_dict(read_config(str(path)))
    quant = resolve_quantization(quantization, None, cfg.raw, CPU)
    return build_model(str(path), cfg, torch.float32, CPU, quant=quant)


def static_scales(num_layers=2):
    """Distinct static input scales per module (larger than any activation/448 of these models)."""
    scales = {}
    for i in range(num_layers):
        for j, name in enumerate(PROJ):
            scales[f"model.layers.{i}.{name}"] = 0.004 + 0.001 * j + 0.0005 * i
    return scales


def fused_max(scales):
    """The scale kiln applies to each module's input: the largest over the modules fused with it."""
    out = {}
    for module in scales:
        prefix, leaf = module.rsplit(".", 1)
        kind = FUSED.get(leaf, leaf)
        parts = [m.rsplit(".", 1) for m in scales]
        group = [f"{p}.{x}" for p, x in parts if p == prefix and FUSED.get(x) == kind] or [module]
        out[module] = torch.tensor(max(scales[m] for m in group))
    return out


@pytest.mark.parametrize(
    "fmt,per_channel,static",
    [
        ("fp8", False, True),  # vLLM / llm-compressor "fp8" static: per-tensor weights and inputs
        ("fp8", False, False),
        ("fp8", True, False),
        ("compressed-tensors", True, False),  # FP8_DYNAMIC preset
        ("compressed-tensors", False, True),  # FP8 preset
    ],
)
def test_checkpoint_logits_match_emulation(fmt, per_channel, static, tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("llama")
    inputs = static_scales() if static else None
    scales = write_fp8_checkpoint(src, str(tmp_path / "fp8"), fmt, per_channel, inputs)
    model = load(tmp_path / "fp8")
    assert sum(isinstance(m, Fp8Linear) for m in model.modules()) == 8
    got = kiln_logits(model, IDS)
    oracle = hf_fp8_model(src, weight_scales=scales, input_scales=fused_max(inputs) if static else None)
    assert rel_error(got, hf_logits(oracle, IDS)) < 1e-3


def test_checkpoint_generates_through_llm(tiny_checkpoint, tmp_path):
    dst = str(tmp_path / "ct")
    write_fp8_checkpoint(tiny_checkpoint("llama"), dst, "compressed-tensors", True)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with LLM(dst, enforce_eager=True) as llm:  # quantization read from config.json
        auto = llm.generate([{"prompt_token_ids": IDS}], params, use_tqdm=False)[0].outputs[0].token_ids
    with LLM(dst, enforce_eager=True, quantization="compressed-tensors") as llm:
        named = llm.generate([{"prompt_token_ids": IDS}], params, use_tqdm=False)[0].outputs[0].token_ids
    assert auto == named and len(auto) == 6
    with pytest.raises(ValueError, match="quantization='fp8' does not match .*'compressed-tensors'"):
        LLM(dst, enforce_eager=True, quantization="fp8")


def _edit(path, file_edit=None, config_edit=None):
    if file_edit is not None:
        for file in [f for f in os.listdir(path) if f.endswith(".safetensors")]:
            tensors = load_file(os.path.join(path, file))
            file_edit(tensors)
            save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
    if config_edit is not None:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        config_edit(config["quantization_config"])
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)


K = "model.layers.1.self_attn.k_proj"


@pytest.mark.parametrize(
    "fmt,per_channel,static,file_edit,config_edit,match",
    [
        ("fp8", False, False, lambda t: t.pop(K + ".weight_scale"), None, rf"missing.*'{K}.weight_scale'"),
        ("fp8", False, True, lambda t: t.pop(K + ".input_scale"), None, rf"missing.*'{K}.input_scale'"),
        ("compressed-tensors", True, False, lambda t: t.update({K + ".weight_scale": torch.ones(63, 1)}),
         None, rf"'{K}.weight_scale' has shape \(63, 1\), expected \(64,\) or \(64, 1\)"),
        ("compressed-tensors", False, False, lambda t: t.update({K + ".weight_scale": torch.ones(64, 1)}),
         None, rf"'{K}.weight_scale' has shape \(64, 1\), expected \(\) or \(1,\)"),
        ("fp8", False, True, lambda t: t.update({K + ".input_scale": torch.ones(2)}), None,
         rf"'{K}.input_scale' has shape \(2,\), expected one value"),
        ("fp8", False, False, lambda t: t.update({K + ".weight_scale": torch.tensor(-1.0)}), None,
         rf"'{K}.weight_scale' holds scales that are not finite and positive"),
        ("fp8", False, False, lambda t: t.update({K + ".weight": t[K + ".weight"].float()}), None,
         rf"'{K}.weight' is torch.float32, expected float8_e4m3fn"),
        ("fp8", False, False, lambda t: t.update({K + ".input_scale": torch.ones(1)}), None,
         rf"unexpected tensor '{K}.input_scale'.*dynamic"),
        ("fp8", False, False, None, lambda q: q.update(weight_block_size=[128, 128]), "block-wise fp8"),
        ("fp8", False, False, None, lambda q: q.update(quant_method="awq"),
         "quant_method 'awq' is not supported"),
        ("compressed-tensors", True, False, None, lambda q: q.update(format="pack-quantized"),
         "format 'pack-quantized' is not supported"),
        ("compressed-tensors", True, False, None,
         lambda q: q["config_groups"]["group_0"].update(input_activations=None), "weight-only"),
    ],
)  # fmt: skip
def test_bad_checkpoints(fmt, per_channel, static, file_edit, config_edit, match, tiny_checkpoint, tmp_path):
    dst = str(tmp_path / "bad")
    write_fp8_checkpoint(tiny_checkpoint("llama"), dst, fmt, per_channel, static_scales() if static else None)
    _edit(dst, file_edit, config_edit)
    with pytest.raises(ValueError, match=match):
        LLM(dst, enforce_eager=True)


def test_ignored_modules_load_unquantized(tiny_checkpoint, tmp_path):
    """compressed-tensors ``ignore`` entries keep their layers in the model dtype (here all down_proj)."""
    src, dst = tiny_checkpoint("llama"), str(tmp_path / "ign")
    write_fp8_checkpoint(src, dst, "compressed-tensors", True)
    original = {}
    for f in os.listdir(src):
        if f.endswith(".safetensors"):
            original.update(load_file(os.path.join(src, f)))

    def restore(tensors):
        for name in [n for n in tensors if ".down_proj." in n]:
            del tensors[name]
        tensors.update({n: t for n, t in original.items() if ".down_proj." in n})

    _edit(dst, restore, lambda q: q["ignore"].append("re:.*down_proj"))
    model = load(dst)
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, Fp8Linear)
    assert torch.isfinite(kiln_logits(model, IDS)).all()
