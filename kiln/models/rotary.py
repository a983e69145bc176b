"""Rotary position embedding (rotate-half layout) with default, linear, dynamic and llama3 scaling."""

import math

import torch
from torch import nn


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Return (inverse frequencies ``[head_dim // 2]``, attention scaling factor)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq, 1.0
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "dynamic":
        # Dynamic NTK only rescales past the original context; within it the frequencies are the default ones.
        return inv_freq, 1.0
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    raise ValueError(
        f"Unsupported rope_scaling type {kind!r}; kiln supports default, linear, dynamic, llama3."
    )


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        super().__init__()
        self.head_dim, self.max_positions, self.theta, self.scaling = head_dim, max_positions, theta, scaling
        self.register_buffer("cos_sin", torch.empty(max_positions, head_dim), persistent=False)

    def reset_cache(self) -> None:
        """(Re)compute the cos/sin table in fp32 on the buffer's device."""
        inv_freq, attn_scale = inv_frequencies(self.head_dim, self.theta, self.scaling)
        pos = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)
        table = torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attn_scale
        self.cos_sin = table.to(self.cos_sin.device)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x ``[T, H, D]`` (queries and keys side by side: one kernel once compiled) -> rotated x."""
        cos, sin = self.cos_sin[positions].to(x.dtype).chunk(2, dim=-1)
        cos = torch.cat([cos, cos], dim=-1)[:, None, :]
        sin = torch.cat([sin, sin], dim=-1)[:, None, :]
        return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
