"""``LoRALinear``: a projection plus the batched LoRA delta of each token's adapter.

The slot tables are buffers of fixed shape ``[max_loras, shards, R, in]`` (``A``) and
``[max_loras, out, R]`` (``B``); loading an adapter copies into them. Two ways to add the delta:

* a plain ``nn.Linear`` base (``stackable``): its weight becomes the head of one ``[out + max_loras x
  shards x R, in]`` tensor whose tail rows are the ``A`` table (same storage), so one product
  ``x @ [W; A].T`` gives the base output and every slot's shrink; ``kiln::lora_expand_stacked`` then
  adds each token's ``h[its slot] @ B[slot].T`` to the head (one kernel a projection). The output is
  the head, a column slice of that product;
* any other base (fp8, GGUF-dequantised replacements): ``y = base(x)`` unchanged, then
  ``kiln::lora_add`` adds ``x @ A[slot].T @ B[slot].T`` per token in place.
"""

import torch
from torch import nn

import kiln.ops.lora_op  # noqa: F401  (registers kiln::lora_add)
from kiln.lora.batch import LoRABatch
from kiln.lora.config import LoRAConfig
from kiln.lora.targets import PROJECTIONS, projection_shapes
from kiln.models.config import ModelConfig


def stackable(base: nn.Module) -> bool:
    """A plain ``nn.Linear`` with floating-point weights: its weight can carry the slots' ``A`` rows."""
    return type(base) is nn.Linear and base.weight.dtype.is_floating_point


def _grown(param: nn.Parameter, extra: int) -> tuple[torch.Tensor, nn.Parameter]:
    """``param`` re-homed as the head of a zeroed tensor ``extra`` rows longer: (that tensor, its head as
    the parameter, sharing its storage)."""
    rows = param.shape[0]
    whole = param.new_zeros((rows + extra, *param.shape[1:]))
    whole[:rows].copy_(param.detach())
    return whole, nn.Parameter(whole[:rows], requires_grad=param.requires_grad)


class LoRALinear(nn.Module):
    def __init__(
        self,
        base: nn.Module,
        in_features: int,
        slice_sizes: list[int],
        config: LoRAConfig,
        batch: LoRABatch,
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__()
        self.base = base
        self.slice_sizes = list(slice_sizes)
        self.out_features = sum(slice_sizes)
        rank, slots = config.table_rank, config.max_loras
        kw = dict(dtype=dtype, device=device)
        table_shape = (slots, len(slice_sizes), rank, in_features)
        self.stacked = stackable(base)
        if self.stacked:  # A as rows under W, one storage: the base product computes the shrink too
            extra = slots * len(slice_sizes) * rank
            weight, base.weight = _grown(base.weight, extra)
            bias = None
            if base.bias is not None:
                bias, base.bias = _grown(base.bias, extra)
            self.register_buffer("stacked_weight", weight, False)
            self.register_buffer("stacked_bias", bias, False)
            lora_a = weight[self.out_features :].view(table_shape)
        else:
            lora_a = torch.zeros(table_shape, **kw)
        # the base module's own parameters also under the wrapper's name, listed first, so parameter
        # names stay the checkpoint's (``...qkv_proj.weight``) and weights load into a wrapped model
        for name, param in list(base.named_parameters(recurse=False)):
            self.register_parameter(name, param)
        self.register_buffer("lora_a", lora_a, False)
        self.register_buffer("lora_b", torch.zeros(slots, self.out_features, rank, **kw), False)
        # the step's slot buffers, shared by every wrapped projection
        self.register_buffer("token_slots", batch.token_slots, False)
        self.register_buffer("sorted_tokens", batch.sorted_tokens, False)
        self.register_buffer("slot_starts", batch.slot_starts, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stacked:
            out = nn.functional.linear(x, self.stacked_weight, self.stacked_bias)
            torch.ops.kiln.lora_expand_stacked(
                out, self.lora_b, self.token_slots, self.sorted_tokens, self.slot_starts, self.out_features,
                self.slice_sizes,
            )  # fmt: skip
            return out[:, : self.out_features]
        y = self.base(x)
        torch.ops.kiln.lora_add(
            y, x, self.lora_a, self.lora_b, self.token_slots, self.sorted_tokens, self.slot_starts,
            self.slice_sizes,
        )  # fmt: skip
        return y


def wrap_projections(
    model: nn.Module, model_config: ModelConfig, config: LoRAConfig, batch: LoRABatch
) -> dict[tuple[int, str], LoRALinear]:
    """Replace every decoder layer's four projections by ``LoRALinear`` around them, in place;
    returns the wrappers by ``(layer index, projection name)``."""
    shapes = projection_shapes(model_config)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    wrappers = {}
    for i, layer in enumerate(model.model.layers):
        for name in PROJECTIONS:
            parent_name, attr = name.split(".")
            parent = getattr(layer, parent_name)
            in_features, slice_sizes = shapes[name]
            wrapped = LoRALinear(
                getattr(parent, attr), in_features, slice_sizes, config, batch, dtype, device
            )
            setattr(parent, attr, wrapped)
            wrappers[(i, name)] = wrapped
    return wrappers
