"""FP8 (float8_e4m3fn) quantization math: weight and activation scales, and the scaled product.

Scales are dequantization factors: ``real ~= fp8 * scale``. Weights get one scale per output channel,
activations one per token (dynamic) or one for the whole tensor (static, from a checkpoint).

Two ways to compute ``x @ w.T`` from the fp8 operands:

- ``torch._scaled_mm`` (CUDA, compute capability >= 8.9): fp8 tensor cores, row-wise scales applied
  in the epilogue, output in the model dtype;
- the reference (everywhere else, and the test oracle): dequantize both operands to fp32, then an fp32
  matmul. Both see exactly the same fp8 values and scales; only the accumulation differs.
"""

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # keeps all-zero rows from dividing by zero
MIN_CAPABILITY = (8, 9)  # Ada and Hopper have fp8 tensor cores


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` rounded to fp8 (round to nearest even), saturated at +-448."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` weight -> (fp8 weight, fp32 scale ``[out]``), each row scaled to its own max."""
    scale = (weight.float().abs().amax(dim=1) / FP8_MAX).clamp_min(MIN_SCALE)
    return to_fp8(weight, scale[:, None]), scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[tokens, features]`` activations -> (fp8, fp32 scale ``[tokens, 1]``), dynamic per row."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE)
    return to_fp8(x, scale), scale


def quantize_activation(x: torch.Tensor, input_scale: torch.Tensor | None):
    """Per-token dynamic scales, or the checkpoint's static per-tensor ``input_scale`` (shape [1])."""
    if input_scale is None:
        return quantize_per_token(x)
    scale = input_scale.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()  # row-wise for _scaled_mm
    return to_fp8(x, scale), scale


def scaled_mm_ref(xq, x_scale, wq, w_scale, out_dtype, bias=None) -> torch.Tensor:
    """The reference product: dequantize ``xq [M, K]`` and ``wq [N, K]`` to fp32, multiply in fp32."""
    x = xq.float() * x_scale
    w = wq.float() * w_scale.float()[:, None]
    out = x @ w.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def scaled_mm_cuda(xq, x_scale, wq, w_scale, out_dtype, bias=None) -> torch.Tensor:
    """fp8 tensor-core product with row-wise scales. Row-wise scaling produces bf16 only, so other
    model dtypes are cast from it; the bias is added afterwards in the model dtype."""
    out = torch._scaled_mm(
        xq, wq.t(), scale_a=x_scale, scale_b=w_scale.float()[None, :], out_dtype=torch.bfloat16
    )
    out = out.to(out_dtype)
    return out if bias is None else out + bias


def fp8_linear(x, weight, weight_scale, input_scale=None, bias=None, use_scaled_mm=None) -> torch.Tensor:
    """``x @ dequant(weight).T (+ bias)`` with ``x`` quantized to fp8 first; output in ``x.dtype``.

    ``use_scaled_mm`` defaults to "is ``x`` on CUDA"; pass it to pick a path explicitly (tests)."""
    shape = x.shape
    x2 = x if x.dim() == 2 else x.reshape(-1, shape[-1])  # the model's rows: no view for the passes to skip
    xq, x_scale = quantize_activation(x2, input_scale)
    if use_scaled_mm is None:
        use_scaled_mm = x.is_cuda
    product = scaled_mm_cuda if use_scaled_mm else scaled_mm_ref
    out = product(xq, x_scale, weight, weight_scale, x.dtype, bias)
    return out if x.dim() == 2 else out.reshape(*shape[:-1], weight.shape[0])


def check_device_supports_fp8(device: torch.device, what: str = "quantization='fp8'") -> None:
    """CUDA devices need fp8 support (tensor cores, Triton's fp8 type); the CPU runs the references."""
    if device.type != "cuda":
        return
    cap = torch.cuda.get_device_capability(device)
    if tuple(cap) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ValueError(
            f"{what} needs a GPU with compute capability >= "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (fp8 tensor cores); {device} ({name}) has "
            f"compute capability {cap[0]}.{cap[1]}"
        )
