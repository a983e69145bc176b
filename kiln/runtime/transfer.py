"""Host-to-device copies that never wait for the device.

``torch.tensor(values, device="cuda")`` copies from pageable memory and blocks until every kernel
already queued has run, which would undo the engine's overlap of host and device work. Going through
pinned memory with ``non_blocking=True`` queues the copy behind them instead.
"""

import torch


def to_device(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
