"""Read a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``, as
``save_pretrained`` writes them) and check it against the base model before any request uses it.

Each target module's delta is ``scale * B @ A`` with ``scale = lora_alpha / r`` (``/ sqrt(r)`` with
``use_rslora``; ``rank_pattern`` and ``alpha_pattern`` per module). The scale is folded into ``B``, and
each kiln projection's weights are stacked and zero-padded to the slot tables' layout here, once, so
that moving an adapter into a device slot is one copy per projection.
"""

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from kiln.lora.config import LoRAConfig
from kiln.lora.request import LoRARequest
from kiln.lora.targets import TARGETS, projection_shapes
from kiln.models.config import ModelConfig

_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_REFUSED_CONFIG = {  # adapter_config.json field -> value kiln accepts
    "use_dora": False,
    "lora_bias": False,
    "fan_in_fan_out": False,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
}


@dataclass
class LoRAAdapter:
    """An adapter in host memory: per (layer, kiln projection), ``A`` as ``[shards, R, in]`` and the
    scaled ``B`` as ``[out, R]`` (``R`` = the table rank; shards the adapter does not target are zero)."""

    request: LoRARequest
    rank: int  # largest rank among its modules
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def id(self) -> int:
        return self.request.lora_int_id


def _fail(request: LoRARequest, reason: str) -> ValueError:
    return ValueError(f"LoRA adapter {request.lora_name!r} ({request.lora_path!r}): {reason}")


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: a key matches a module name ending in it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter_config(request: LoRARequest) -> dict:
    path = request.lora_path
    if not path or not os.path.isdir(path):
        raise _fail(request, "lora_path is not a directory")
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        raise _fail(request, "no adapter_config.json in the directory")
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise _fail(request, f"adapter_config.json is not valid JSON: {e}") from e
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise _fail(request, f"peft_type must be 'LORA', got {config.get('peft_type')!r}")
    for name, accepted in _REFUSED_CONFIG.items():
        if config.get(name, accepted) not in (accepted, [], {}):
            raise _fail(request, f"{name}={config[name]!r} is not supported")
    if config.get("bias", "none") != "none":
        raise _fail(request, f"bias={config['bias']!r} is not supported (only 'none')")
    if config.get("modules_to_save"):
        raise _fail(
            request,
            f"modules_to_save={config['modules_to_save']!r}: adapters that also train whole modules "
            "(embeddings, lm_head) are not supported",
        )
    targets = config.get("target_modules")
    names = [targets] if isinstance(targets, str) else list(targets or [])
    for name in names:
        short = name.split(".")[-1]
        if short in ("embed_tokens", "lm_head"):
            raise _fail(request, f"target module {name!r}: embedding and lm_head adapters are not supported")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise _fail(
                request, f"adapter_config.json: {key} must be a positive number, got {config.get(key)!r}"
            )
    return config


def _read_tensors(request: LoRARequest) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = os.path.join(request.lora_path, "adapter_model.safetensors")
    if not os.path.isfile(file):
        raise _fail(request, "no adapter_model.safetensors in the directory")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise _fail(request, f"adapter_model.safetensors cannot be read: {e}") from e


def load_adapter(
    request: LoRARequest, model_config: ModelConfig, lora_config: LoRAConfig, dtype: torch.dtype
) -> LoRAAdapter:
    """Read, check and lay out ``request``'s adapter (host memory, ``dtype``); ValueError naming the
    adapter and the reason when it cannot serve this model."""
    config = read_adapter_config(request)
    tensors = _read_tensors(request)
    modules: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise _fail(
                request, f"tensor {key!r}: kiln supports LoRA on {sorted(TARGETS)} of decoder layers only"
            )
        layer, parent, module, which = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if module not in TARGETS or not TARGETS[module][0].startswith(parent + "."):
            raise _fail(
                request,
                f"tensor {key!r}: unsupported target module {module!r} (supported: {sorted(TARGETS)})",
            )
        if layer >= model_config.num_layers:
            raise _fail(
                request,
                f"tensor {key!r}: layer {layer} does not exist (the model has {model_config.num_layers})",
            )
        modules.setdefault((layer, module), {})[which] = tensor
    if not modules:
        raise _fail(request, "adapter_model.safetensors holds no LoRA weights")

    shapes = projection_shapes(model_config)
    table_rank = lora_config.table_rank
    use_rslora = bool(config.get("use_rslora", False))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    adapter = LoRAAdapter(request, rank=0)
    for (layer, module), pair in sorted(modules.items()):
        name = f"model.layers.{layer}.{TARGETS[module][0].split('.')[0]}.{module}"
        if set(pair) != {"A", "B"}:
            raise _fail(request, f"{name}: lora_{'B' if 'A' in pair else 'A'}.weight is missing")
        a, b = pair["A"], pair["B"]
        projection, shard = TARGETS[module]
        in_features, shard_sizes = shapes[projection]
        r = a.shape[0] if a.dim() == 2 else -1
        expected_a, expected_b = (r, in_features), (shard_sizes[shard], r)
        if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
            raise _fail(
                request,
                f"{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not match the base model "
                f"(expected {expected_a} / {expected_b} for rank {r})",
            )
        if r > lora_config.max_lora_rank:
            raise _fail(request, f"{name}: rank {r} exceeds max_lora_rank={lora_config.max_lora_rank}")
        declared = _pattern_value(rank_pattern, name, config["r"])
        if declared != r:
            raise _fail(request, f"{name}: tensors have rank {r} but adapter_config.json says {declared}")
        alpha = _pattern_value(alpha_pattern, name, config["lora_alpha"])
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        adapter.rank = max(adapter.rank, r)

        entry = adapter.weights.get((layer, projection))
        if entry is None:
            entry = (
                torch.zeros(len(shard_sizes), table_rank, in_features, dtype=dtype),
                torch.zeros(sum(shard_sizes), table_rank, dtype=dtype),
            )
            adapter.weights[(layer, projection)] = entry
        lo = sum(shard_sizes[:shard])
        entry[0][shard, :r] = a.float()
        entry[1][lo : lo + shard_sizes[shard], :r] = b.float() * scale
    return adapter
