"""Warm starts reuse Inductor's coordinate-descent results instead of tuning the same kernels again.

Inductor saves the config that coordinate descent found next to each kernel (``*.best_config``) and a
later start loads it, but on torch 2.11 (the H100 machine) the loaded config loses its
``found_by_coordesc`` mark, so each warm start tunes the kernel once more, starting from the saved
config: seconds of start-up, and a different winner in every process. ``reuse_tuned_configs()`` makes
a kernel whose config came from that cache skip the new tuning. It wraps one method of Inductor's
``CachingAutotuner`` once per process and leaves it alone where that method does not exist.
"""

import functools


def reuse_tuned_configs() -> bool:
    """Install the wrapper (idempotent); False where Inductor has no such method."""
    try:
        from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    except ImportError:
        return False
    tune = getattr(CachingAutotuner, "coordinate_descent_tuning", None)
    if tune is None:
        return False
    if getattr(tune, "kiln_reuses_cached", False):
        return True

    @functools.wraps(tune)
    def coordinate_descent_tuning(self, launcher, *args, **kwargs):
        info = getattr(self, "autotune_cache_info", None) or {}
        if info.get("autotune_cache_state") == "hit":
            return launcher  # compiled with the cached best config already
        return tune(self, launcher, *args, **kwargs)

    coordinate_descent_tuning.kiln_reuses_cached = True
    CachingAutotuner.coordinate_descent_tuning = coordinate_descent_tuning
    return True
