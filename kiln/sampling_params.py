"""``kiln.sampling_params``: the import path of ``vllm.sampling_params``."""

from kiln.runtime.sampling_params import (
    SAMPLING_EPS,
    RequestOutputKind,
    SamplingParams,
    SamplingType,
)

__all__ = ["SAMPLING_EPS", "RequestOutputKind", "SamplingParams", "SamplingType"]
