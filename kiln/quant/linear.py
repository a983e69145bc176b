"""``Fp8Linear``: a drop-in for a projection ``nn.Linear`` holding an fp8 weight and its scales.

Same ``in_features`` / ``out_features`` and ``forward(x)`` as the module it replaces; the output is in
``x``'s dtype. Parameters (names as in FP8 checkpoints):

- ``weight`` float8_e4m3fn ``[out, in]``;
- ``weight_scale`` fp32 ``[out]``: one scale per output channel (a per-tensor checkpoint scale is
  repeated over its rows, which is exact);
- ``input_scale`` fp32 ``[out]``, only with static activation scales: while loading, each fused shard
  (q/k/v, gate/up) writes its checkpoint scale over its rows; ``finish_loading`` reduces them to the
  largest one (one scale per input tensor; the largest never saturates where a shard's own would not);
- ``bias`` in the model dtype, when the layer has one.
"""

import torch
from torch import nn

from kiln.quant.fp8 import FP8_DTYPE, fp8_linear, quantize_per_channel


class Fp8Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        static_input_scale: bool = False,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        kw = dict(requires_grad=False)
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device), **kw
        )
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device), **kw)
        self.input_scale = None
        if static_input_scale:
            self.input_scale = nn.Parameter(
                torch.empty(out_features, dtype=torch.float32, device=device), **kw
            )
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), **kw)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        """Quantize a loaded ``nn.Linear`` (per-output-channel weight scales, dynamic activations)."""
        w = linear.weight.data
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device)
        qweight, scale = quantize_per_channel(w)
        module.weight.data, module.weight_scale.data = qweight, scale
        if linear.bias is not None:
            module.bias.data = linear.bias.data
        return module

    def finish_loading(self) -> None:
        if self.input_scale is not None and self.input_scale.numel() > 1:
            self.input_scale = nn.Parameter(self.input_scale.data.amax().reshape(1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.input_scale, self.bias)

    def extra_repr(self) -> str:
        act = "static" if self.input_scale is not None else "dynamic per-token"
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8, activations={act}"
