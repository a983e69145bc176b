"""Memory figures of start-up measured once and reused by warm starts.

A cold start measures the compiled forward's activation peak at the largest batch and the memory the
CUDA graphs take, and records both in the compile cache entry (``measurements.json``). The entry already
keys everything that changes the code (model, dtype, device, compilation settings); each figure's name
adds what else it depends on: the batch shape, the attention backend and its block size, the KV-cache
dtype and the allocator's settings. A warm start with the same figure name reads it instead of
running the profile; any other start measures it again. Memory settings (``gpu_memory_utilization``,
``kv_cache_memory_bytes``) only decide what the KV cache gets from free memory, so they key nothing.
"""

import hashlib
import json
from collections.abc import Callable

from kiln import envs


def measurement_name(kind: str, spec: dict) -> str:
    spec = {**spec, "allocator": envs.cuda_alloc_conf()}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{kind}_{digest}"


def recorded_or_measured(cache, name: str, measure: Callable[[], int]) -> tuple[int, str]:
    """(bytes, "recorded" or "measured"): the figure an earlier start recorded under ``name`` in
    ``cache`` (a ``CompileCache`` or None), else ``measure()``, recorded for the next start."""
    recorded = cache.measurement(name) if cache is not None else None
    if recorded is not None:
        return int(recorded), "recorded"
    value = int(measure())
    if cache is not None:
        cache.record_measurement(name, value)
    return value, "measured"
