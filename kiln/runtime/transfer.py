"""Host-to-device copies that never wait for the device.

``torch.tensor(values, device="cuda")`` copies from pageable memory and blocks until every kernel
already queued has run, which would undo the engine's overlap of host and device work. Going through
pinned memory with ``non_blocking=True`` queues the copy behind them instead.
"""

from array import array

import torch

ALIGN_BYTES = 16  # Triton specialises kernels on 16-byte pointer alignment
_TYPECODES = {torch.long: "q", torch.int32: "i"}


def host_tensor(values, dtype: torch.dtype | None = None, pin: bool = False) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)``; a flat list of ints goes through ``array`` (about 4x
    faster than ``torch.tensor`` on a list: the step's metadata is built this way every step), an
    ``array`` of the dtype's type code is copied whole."""
    code = _TYPECODES.get(dtype)
    if code is not None and values:
        try:
            flat = torch.frombuffer(array(code, values), dtype=dtype)
        except (TypeError, OverflowError):  # nested lists, values past the type: torch's rules
            pass
        else:
            if not pin:
                return flat
            pinned = torch.empty(flat.shape, dtype=dtype, pin_memory=True)
            return pinned.copy_(flat)
    return torch.tensor(values, dtype=dtype, pin_memory=pin)


def to_device(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    if device.type != "cuda":
        return host_tensor(values, dtype).to(device)
    return host_tensor(values, dtype, pin=True).to(device, non_blocking=True)


def sections_to_device(sections: list[list], device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """Several lists in one copy, each returned as a view that starts on a 16-byte boundary.

    Without the padding a section's alignment would depend on the lengths before it, and every
    kernel taking it would be compiled once per alignment seen."""
    per = max(1, ALIGN_BYTES // torch.tensor([], dtype=dtype).element_size())
    code = _TYPECODES.get(dtype)
    try:  # an array section (a block table) is copied whole, a list converted id by id
        flat, bounds = _packed(array(code) if code else [], sections, per)
    except (TypeError, OverflowError):  # values past the type: torch's rules (host_tensor)
        flat, bounds = _packed([], sections, per)
    packed = to_device(flat, device, dtype)
    return [packed[a:b] for a, b in bounds]


def _packed(flat, sections: list, per: int):
    """``sections`` one after another in ``flat`` (an ``array``, or a list), each padded to ``per``
    values; their ``(start, end)`` in it."""
    bounds = []
    fast = isinstance(flat, array)
    for values in sections:
        start = len(flat)
        if fast and isinstance(values, list):
            flat.fromlist(values)  # a list's fast path; ``extend`` goes item by item through an iterator
        else:
            flat.extend(values)
        bounds.append((start, len(flat)))
        flat.extend([0] * (-len(flat) % per))
    return flat, bounds
