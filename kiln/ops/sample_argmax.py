"""The sampler's last step: per row, ``argmax(logits * inv_temp - log(q))``, first index on ties.

With ``q ~ Exp(1)`` this draws from ``softmax(logits * inv_temp)`` (the exponential race; ``-log q`` is
Gumbel noise), so no softmax is computed. A row with ``inv_temp == 0`` is greedy: the plain argmax of
its logits, whatever ``q`` holds. Without ``q`` every row is greedy. Any float dtype is read as fp32.

On CUDA two Triton kernels do it: the first finds the best (value, index) of each ``CHUNK`` of a row,
the second the best chunk; two launches instead of the five of an eager softmax, noise and argmax
(a one-block-per-row argmax alone takes ~27 us for a 128k vocabulary on an H100). Torch elsewhere.
"""

import functools
import importlib.util

import torch

CHUNK, BLOCK = 2048, 1024


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None  # CPU-only installs lack it


def sample_argmax_ref(logits: torch.Tensor, inv_temp: torch.Tensor | None, q: torch.Tensor | None):
    x = logits.float()
    if q is None:
        return x.argmax(-1)
    noisy = x * inv_temp[:, None] - q.log()
    return torch.where(inv_temp[:, None] == 0, x, noisy).argmax(-1)


def sample_argmax_triton(
    logits: torch.Tensor, inv_temp: torch.Tensor | None, q: torch.Tensor | None, token_mask=None
):
    from kiln.ops.triton_sample_argmax import sample_argmax_triton as run

    return run(logits, inv_temp, q, token_mask)


def sample_argmax(
    logits: torch.Tensor,
    inv_temp: torch.Tensor | None = None,
    q: torch.Tensor | None = None,
    token_mask=None,
):
    """Token per row of ``logits`` ``[rows, vocab]``; ``inv_temp`` ``[rows]`` and ``q`` ``[rows, vocab]``
    (fp32) together, or neither (greedy). Rows must be contiguous in the last dimension.

    ``token_mask`` (a ``kiln.structured.token_mask.TokenMask``): the grammar's allowed tokens of the
    constrained rows, the others banned. The Triton kernel reads its bitmask words beside the logits
    (no masked copy of the logits, no extra launch); elsewhere it is applied to the logits first."""
    if (q is None) != (inv_temp is None):
        raise ValueError("sample_argmax needs both inv_temp and q, or neither")
    if logits.is_cuda and _triton_available() and logits.stride(-1) == 1 and (q is None or q.stride(-1) == 1):
        return sample_argmax_triton(logits, inv_temp, q, token_mask)
    if token_mask is not None:
        logits = token_mask.apply(logits)
    return sample_argmax_ref(logits, inv_temp, q)
