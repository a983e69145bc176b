"""Safetensors files read through a memory map: every tensor is a view of the mapped file, no copy.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte offsets
into the data that follows) and the data. ``open_safetensors`` maps the file privately (copy-on-write,
so the views are writable and nothing is ever written back) and yields ``(name, view)``; the only copy
of each tensor is the one into its parameter (``weight_copy.py``). The map stays alive as long as a view
of it does.
"""

import json
import mmap
import os
import struct
from collections.abc import Iterator

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _damaged(path: str, why: str) -> ValueError:
    return ValueError(f"model: weights file {path!r} is damaged or incomplete ({why})")


def read_header(path: str) -> tuple[dict, int, int]:
    """(header without ``__metadata__``, offset of the data, file size)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise _damaged(path, "no header")
        (length,) = struct.unpack("<Q", raw)
        if length > size - 8:
            raise _damaged(path, f"header of {length} bytes in a file of {size}")
        try:
            header = json.loads(f.read(length))
        except ValueError as e:
            raise _damaged(path, f"header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise _damaged(path, "header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + length, size


def open_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for each tensor of the file, in file order; each tensor views the mapped file."""
    header, start, size = read_header(path)
    entries = []
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            lo, hi = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise _damaged(path, f"tensor {name!r}: bad header entry {info!r}") from e
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if hi - lo != nbytes or lo < 0 or start + hi > size:
            raise _damaged(path, f"tensor {name!r}: bytes {lo}..{hi} past the end or of the wrong size")
        entries.append((lo, name, dtype, shape, hi))
    if not entries:
        return
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    data = torch.frombuffer(mapped, dtype=torch.uint8)
    for lo, name, dtype, shape, hi in sorted(entries, key=lambda e: e[0]):
        raw = data[start + lo : start + hi]
        if (start + lo) % raw.new_empty((), dtype=dtype).element_size():
            raw = raw.clone()  # unaligned in the file: a view of another dtype needs aligned bytes
        yield name, raw.view(dtype).view(shape)
