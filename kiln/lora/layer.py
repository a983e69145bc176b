"""``LoRALinear``: a projection plus the batched LoRA delta of each token's adapter.

It wraps whatever module computes the base product (``nn.Linear`` or any replacement with the same
call) and calls it unchanged: ``y = base(x)``, then ``kiln::lora_add`` adds ``x @ A[slot].T @ B[slot].T``
per token, in place. The slot tables are buffers of fixed shape
``[max_loras, shards, R, in]`` and ``[max_loras, out, R]``; loading an adapter copies into them.
"""

import torch
from torch import nn

import kiln.ops.lora_op  # noqa: F401  (registers kiln::lora_add)
from kiln.lora.batch import LoRABatch
from kiln.lora.config import LoRAConfig
from kiln.lora.targets import PROJECTIONS, projection_shapes
from kiln.models.config import ModelConfig


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
        # the base module's own parameters also under the wrapper's name, listed first, so parameter
        # names stay the checkpoint's (``...qkv_proj.weight``) and weights load into a wrapped model
        for name, param in list(base.named_parameters(recurse=False)):
            self.register_parameter(name, param)
        self.base = base
        self.slice_sizes = list(slice_sizes)
        rank, slots = config.table_rank, config.max_loras
        kw = dict(dtype=dtype, device=device)
        self.register_buffer("lora_a", torch.zeros(slots, len(slice_sizes), rank, in_features, **kw), False)
        self.register_buffer("lora_b", torch.zeros(slots, sum(slice_sizes), rank, **kw), False)
        # the step's slot buffers, shared by every wrapped projection
        self.register_buffer("token_slots", batch.token_slots, False)
        self.register_buffer("sorted_tokens", batch.sorted_tokens, False)
        self.register_buffer("slot_starts", batch.slot_starts, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
