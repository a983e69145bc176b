"""Which quantization a model runs with: ``LLM(quantization=..., quantization_config=...)`` and the
checkpoint's ``quantization_config`` (config.json), validated before anything is loaded.

- ``quantization="fp8"`` on an unquantized checkpoint: weights quantized at load (per output channel),
  activations per token, dynamically. ``quantization_config`` may then hold ``activation_scheme``
  (``"dynamic"``, the only choice without calibrated scales) and ``ignored_layers``.
- A checkpoint whose config has ``quant_method: "fp8"`` (weights stored as float8_e4m3fn with
  ``weight_scale``, static activations with ``input_scale``) or ``"compressed-tensors"`` in the
  ``float-quantized`` format (read with the ``compressed-tensors`` package) loads as it is stored;
  ``quantization`` may be left ``None`` or must name the same method.
"""

import re
from dataclasses import dataclass

import torch

from kiln.quant.fp8 import check_device_supports_fp8

SUPPORTED_METHODS = ("fp8", "compressed-tensors")
_ONLINE_KEYS = ("activation_scheme", "ignored_layers")


@dataclass(frozen=True)
class QuantConfig:
    method: str  # one of SUPPORTED_METHODS
    serialized: bool  # the checkpoint already stores fp8 weights and their scales
    static_activations: bool  # per-tensor activation scales from the checkpoint (input_scale)
    weight_strategy: str | None = None  # "tensor" | "channel" scales in the checkpoint; None: either
    ignore: tuple[str, ...] = ()  # checkpoint module names (or "re:<pattern>") left unquantized

    def is_ignored(self, module_name: str) -> bool:
        for entry in self.ignore:
            if entry.startswith("re:"):
                if re.fullmatch(entry[3:], module_name):
                    return True
            elif module_name == entry or module_name.endswith("." + entry):
                return True
        return False


def resolve_quantization(
    quantization: str | None, quantization_config: dict | None, hf_config: dict, device: torch.device
) -> QuantConfig | None:
    """The model's quantization, or None. Raises ValueError naming the offending field or value."""
    if quantization is not None:
        if not isinstance(quantization, str) or quantization.lower() not in SUPPORTED_METHODS:
            raise ValueError(
                f"quantization: unsupported method {quantization!r}; kiln supports "
                f"{', '.join(repr(m) for m in SUPPORTED_METHODS)} (or None)"
            )
        quantization = quantization.lower()
    if quantization_config is not None and not isinstance(quantization_config, dict):
        raise ValueError(f"quantization_config must be a dict, got {type(quantization_config).__name__}")
    stored = hf_config.get("quantization_config")
    if stored:
        method = str(stored.get("quant_method", "")).lower()
        if method not in SUPPORTED_METHODS:
            raise ValueError(
                f"checkpoint quantization_config: quant_method {stored.get('quant_method')!r} is not "
                f"supported; kiln supports {', '.join(repr(m) for m in SUPPORTED_METHODS)}"
            )
        if quantization is not None and quantization != method:
            raise ValueError(
                f"quantization={quantization!r} does not match the checkpoint's quant_method {method!r}"
            )
        if quantization_config:
            raise ValueError(
                "quantization_config: the checkpoint is already quantized (its config.json has a "
                "quantization_config); pass none"
            )
        config = _from_fp8(stored) if method == "fp8" else _from_compressed_tensors(stored)
    elif quantization is None:
        if quantization_config:
            raise ValueError("quantization_config needs quantization='fp8' for an unquantized checkpoint")
        return None
    elif quantization == "fp8":
        config = _online_fp8(quantization_config or {})
    else:
        raise ValueError(
            "quantization='compressed-tensors' needs a checkpoint saved by compressed-tensors "
            "(config.json has no quantization_config)"
        )
    check_device_supports_fp8(device)
    return config


def _online_fp8(options: dict) -> QuantConfig:
    unknown = sorted(set(options) - set(_ONLINE_KEYS))
    if unknown:
        raise ValueError(f"quantization_config: unknown keys {unknown} (valid keys: {list(_ONLINE_KEYS)})")
    scheme = options.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ValueError(
            f"quantization_config: activation_scheme={scheme!r}; quantizing at load supports 'dynamic' "
            "only (static scales come from a pre-quantized checkpoint)"
        )
    ignored = options.get("ignored_layers") or []
    if not isinstance(ignored, (list, tuple)) or not all(isinstance(s, str) for s in ignored):
        raise ValueError(f"quantization_config: ignored_layers must be a list of names, got {ignored!r}")
    return QuantConfig("fp8", serialized=False, static_activations=False, ignore=tuple(ignored))


def _from_fp8(stored: dict) -> QuantConfig:
    """HF / vLLM ``quant_method: "fp8"``: per-tensor (or per-channel) weight scales, activations static
    (``input_scale`` per layer) or dynamic."""
    where = "checkpoint quantization_config"
    if stored.get("weight_block_size") is not None:
        raise ValueError(
            f"{where}: block-wise fp8 (weight_block_size={stored['weight_block_size']!r}) is not supported; "
            "kiln reads per-tensor and per-channel weight scales"
        )
    fmt = stored.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"{where}: fmt={fmt!r} is not supported (only 'e4m3')")
    scheme = stored.get("activation_scheme", "dynamic")
    if scheme not in ("static", "dynamic"):
        raise ValueError(f"{where}: activation_scheme must be 'static' or 'dynamic', got {scheme!r}")
    ignored = stored.get("ignored_layers") or stored.get("modules_to_not_convert") or []
    return QuantConfig("fp8", serialized=True, static_activations=scheme == "static", ignore=tuple(ignored))


def _from_compressed_tensors(stored: dict) -> QuantConfig:
    """compressed-tensors ``float-quantized``: one scheme over the Linear layers, 8-bit float weights
    with tensor or channel scales, 8-bit float activations (static per-tensor or dynamic per-token)."""
    try:
        from compressed_tensors.quantization import QuantizationConfig as CTConfig
    except ImportError as e:
        raise ValueError(
            "this checkpoint is quantized with compressed-tensors: pip install compressed-tensors "
            "(or kiln[quant])"
        ) from e
    where = "checkpoint quantization_config (compressed-tensors)"
    try:
        ct = CTConfig.model_validate(stored)
    except Exception as e:
        raise ValueError(f"{where}: {e}") from e
    if ct.format != "float-quantized":
        raise ValueError(f"{where}: format {ct.format!r} is not supported (only 'float-quantized')")
    if ct.kv_cache_scheme is not None:
        raise ValueError(f"{where}: kv_cache_scheme is not supported (use kv_cache_dtype='fp8')")
    if len(ct.config_groups) != 1:
        raise ValueError(f"{where}: expected one config group, got {sorted(ct.config_groups)}")
    ((name, scheme),) = ct.config_groups.items()
    w, a = scheme.weights, scheme.input_activations
    w_strategy = _value(w.strategy) if w is not None else None
    if (
        w is None
        or _value(w.type) != "float"
        or w.num_bits != 8
        or not w.symmetric
        or w_strategy
        not in (
            "tensor",
            "channel",
        )
    ):
        raise ValueError(
            f"{where}: group {name!r} weights must be symmetric 8-bit float with 'tensor' or 'channel' "
            f"strategy, got {w}"
        )
    if a is None:
        raise ValueError(f"{where}: group {name!r} is weight-only (no input_activations); not supported")
    static = _value(a.strategy) == "tensor" and not a.dynamic
    dynamic = _value(a.strategy) == "token" and bool(a.dynamic)
    if _value(a.type) != "float" or a.num_bits != 8 or not (static or dynamic):
        raise ValueError(
            f"{where}: group {name!r} input_activations must be 8-bit float, static 'tensor' or dynamic "
            f"'token', got {a}"
        )
    if scheme.output_activations is not None:
        raise ValueError(f"{where}: group {name!r} output_activations are not supported")
    if "Linear" not in scheme.targets:
        raise ValueError(f"{where}: group {name!r} targets {list(scheme.targets)}; expected ['Linear']")
    return QuantConfig(
        "compressed-tensors",
        serialized=True,
        static_activations=static,
        weight_strategy=w_strategy,
        ignore=tuple(ct.ignore or ()),
    )


def _value(field):
    """compressed-tensors fields are str enums; compare their plain values."""
    return getattr(field, "value", field)
