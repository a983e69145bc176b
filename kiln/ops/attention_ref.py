"""Pure-torch reference for the paged KV store and paged attention (CPU default, test oracle)."""

import torch

from kiln.ops.metadata import AttentionMetadata
from kiln.quant.fp8 import FP8_DTYPE, to_fp8


def store_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write k/v ``[num_tokens, num_kv_heads, head_dim]`` into ``kv_cache`` at ``slot_mapping``.

    Slots of -1 are padding and are skipped. An fp8 cache stores ``k / k_scale`` and ``v / v_scale``
    rounded to float8_e4m3fn (saturated at +-448).
    """
    block_size = kv_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    if kv_cache.dtype == FP8_DTYPE:
        kv_cache[0, blocks, offsets] = to_fp8(k[keep], k_scale)
        kv_cache[1, blocks, offsets] = to_fp8(v[keep], v_scale)
        return
    kv_cache[0, blocks, offsets] = k[keep].to(kv_cache.dtype)
    kv_cache[1, blocks, offsets] = v[keep].to(kv_cache.dtype)


def paged_attention_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    md: AttentionMetadata,
    scale: float,
    sliding_window: int = 0,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of q ``[num_tokens, num_heads, head_dim]`` over each sequence's paged context.

        Query token ``t`` of a sequence sits at position ``seq_len - query_len + t`` and attends to positions
        ``p <= its own`` (and ``p > pos - sliding_window`` when ``sliding_window > 0``). Accumulates in fp32;
    an fp8 cache is dequantized (times ``k_scale`` / ``v_scale``) first.
    """
    if out is None:
        out = torch.empty_like(q)
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    starts = md.query_start_loc.tolist()
    seq_lens = md.seq_lens.tolist()
    for i, seq_len in enumerate(seq_lens):
        q_lo, q_hi = starts[i], starts[i + 1]
        q_len = q_hi - q_lo
        if q_len == 0:
            continue
        n_blocks = (seq_len + block_size - 1) // block_size
        blocks = md.block_tables[i, :n_blocks].long()
        k = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        v = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        if kv_cache.dtype == FP8_DTYPE:
            k, v = k * k_scale, v * v_scale
        k = k.repeat_interleave(group, dim=1)  # [seq_len, num_heads, head_dim]
        v = v.repeat_interleave(group, dim=1)
        qs = q[q_lo:q_hi].float()
        scores = torch.einsum("qhd,khd->hqk", qs, k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if sliding_window > 0:
            mask &= k_pos > q_pos - sliding_window
        scores.masked_fill_(~mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        out[q_lo:q_hi] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)
    return out
