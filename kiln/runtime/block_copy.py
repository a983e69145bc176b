"""Copies of whole KV blocks on the device: a forked beam's last, partial block
(``SchedulerOutput.copy_blocks``)."""

import torch


@torch.inference_mode()
def copy_blocks(kv_caches: list[torch.Tensor], pairs: list[tuple[int, int]]) -> None:
    """For each ``(src, dst)``, block ``dst`` of every layer's cache (``[2, num_blocks, block_size,
    kv_heads, head_dim]``, keys and values) becomes a copy of block ``src``. Queued on the current
    stream, ahead of the step's forward; sources are read before any destination is written."""
    if not pairs or not kv_caches:
        return
    device = kv_caches[0].device
    index = torch.tensor(pairs, dtype=torch.long)
    if device.type == "cuda":
        index = index.pin_memory().to(device, non_blocking=True)
    src, dst = index[:, 0], index[:, 1]
    for kv in kv_caches:
        data = kv.view(torch.uint8) if kv.element_size() == 1 else kv  # fp8 caches copied as bytes
        data.index_copy_(1, dst, data.index_select(1, src))
