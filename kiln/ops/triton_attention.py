"""Triton paged attention: the entry points the ``kiln::attention`` op calls for backend "triton".

Same semantics as ``kiln.ops.attention_ref`` (``store_kv_ref``, ``paged_attention_ref``); cache layout
``[2, num_blocks, block_size, num_kv_heads, head_dim]`` as in ``kiln.ops.metadata``.

Kernels:
  * ``triton_store_kv``: one program per token copies its K/V rows to their slot (-1 skipped).
  * ``triton_decode``: pure-decode steps (``md.max_query_len == 1``): split-K flash-decoding, one
    program per (sequence, kv head, KV split); the last split to finish combines the others.
  * ``triton_prefill``: any other step, mixed decode + prefill chunks included: tiled flash attention
    over paged KV with causal masking, one program per (query tile, kv head).
Both attention kernels put all query heads of a kv head (GQA group) into the rows of one ``tl.dot``,
accumulate in fp32, support any head_dim (padded to a power of two and masked), any block_size,
fp16/bf16/fp32 and a sliding window. A float8_e4m3fn cache (``kv_cache_dtype="fp8"``) holds
``K / k_scale`` and ``V / v_scale`` (per-layer scales); the kernels dequantize each tile in registers.

CUDA graphs: nothing here synchronises with the host or allocates memory whose size depends on data.
Grids depend on tensor shapes, plus ``md.max_query_len`` for the prefill tile height. For pure
decode the number of KV splits is a function of shapes only: as many (sequence, kv head, split)
programs as fit in one wave of ``PROGRAMS_PER_SM`` one-warp programs per multiprocessor, capped so that
a split holds at least ``MIN_SPLIT_TOKENS`` of the longest context the block table can address
(``block_tables.shape[1] * block_size``) and at most ``MAX_SPLITS``; fewer than ``MIN_SPLITS`` become
one split (many sequences: the unsplit kernel with its wider tile already fills the GPU, and the merge
launch would only add time: 2 splits at batch 64 cost 3-5% on the H200). A shorter sequence uses fewer of
them, one per ``MIN_SPLIT_TOKENS`` of its own context. Each split's share of a sequence is
computed in the kernel from ``seq_lens``, so a captured graph replays correctly for any ``seq_lens``
that fit the block table. The split workspace (fp32, ``num_seqs * num_heads * num_splits *
(head_dim_p2 + 2)`` floats) is allocated per call with a shape-only size. Pass ``num_splits`` to pin it.
"""

import functools

import torch
import triton

from kiln.ops.metadata import AttentionMetadata
from kiln.ops.triton_decode import decode_attention
from kiln.ops.triton_prefill import prefill_attention, prefill_config
from kiln.ops.triton_store_kv import store_kv_triton

__all__ = ["choose_num_splits", "paged_attention_triton", "store_kv_triton"]

MIN_SPLIT_TOKENS = 32
MIN_SPLITS = 4
MAX_SPLITS = 256
PROGRAMS_PER_SM = 8  # split programs are one warp each (see triton_decode._decode_config)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """KV splits per (sequence, kv head) for decode; depends on shapes only (see module docstring)."""
    by_occupancy = PROGRAMS_PER_SM * _sm_count(device) // max(1, num_seqs * num_kv_heads)
    by_length = -(-max_context // MIN_SPLIT_TOKENS)
    splits = min(by_occupancy, by_length, MAX_SPLITS)
    return splits if splits >= MIN_SPLITS else 1


def warmup_metadata(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[AttentionMetadata]:
    """Dummy steps that together launch every compiled variant of the attention kernels a run can pick:
    one prefill per tile configuration (``BLOCK_Q`` follows the step's longest query) and a decode
    step with and without KV splits. Run once at start-up, they keep Triton's compiles out of the
    first requests. Nothing is stored (slots -1) and every block-table entry is block 0."""
    group_p2 = triton.next_power_of_2(num_heads // num_kv_heads)
    head_dim_p2 = max(16, triton.next_power_of_2(head_dim))
    elem = torch.tensor([], dtype=dtype).element_size()
    steps, seen = [], set()
    for query_len in (2, 4, 8, 16, 32, 64, 128, 256):
        cfg = tuple(sorted(prefill_config(head_dim_p2, group_p2, elem, query_len).items()))
        if cfg not in seen:
            seen.add(cfg)
            steps.append(AttentionMetadata.single_sequence(query_len, block_size, device, store=False))
    # decode without splits (more sequences than one wave of programs) and with them (one long sequence)
    crowd = PROGRAMS_PER_SM * _sm_count(device) // num_kv_heads + 1
    for num_seqs, context in ((crowd, 1), (1, 2 * MIN_SPLITS * MIN_SPLIT_TOKENS)):
        ints = dict(dtype=torch.int32, device=device)
        steps.append(
            AttentionMetadata(
                slot_mapping=torch.full((num_seqs,), -1, device=device),
                query_start_loc=torch.arange(num_seqs + 1, **ints),
                seq_lens=torch.full((num_seqs,), context, **ints),
                block_tables=torch.zeros(num_seqs, -(-context // block_size), **ints),
                max_query_len=1,
                max_seq_len=context,
            )
        )
    return steps


def paged_attention_triton(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    md: AttentionMetadata,
    scale: float,
    sliding_window: int = 0,
    out: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of q ``[num_tokens, num_heads, head_dim]`` over each sequence's paged context
    (an fp8 cache holds K / k_scale and V / v_scale)."""
    if out is None:
        out = torch.empty_like(q)
    if q.shape[0] == 0 or md.num_seqs == 0:
        return out
    assert q.stride(-1) == 1 and out.stride(-1) == 1 and kv_cache.stride(-1) == 1
    if md.max_query_len <= 1:
        if num_splits is None:
            max_context = md.block_tables.shape[1] * kv_cache.shape[2]
            num_splits = choose_num_splits(md.num_seqs, kv_cache.shape[3], max_context, q.device)
        decode_attention(
            q, kv_cache, md, scale, sliding_window, out, num_splits,
            min_split=MIN_SPLIT_TOKENS, k_scale=k_scale, v_scale=v_scale,
        )  # fmt: skip
    else:
        prefill_attention(q, kv_cache, md, scale, sliding_window, out, k_scale=k_scale, v_scale=v_scale)
    return out
