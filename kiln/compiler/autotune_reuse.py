"""Warm starts reuse Inductor's coordinate-descent results instead of tuning the same kernels again.

Inductor saves the config that coordinate descent found next to each kernel (``*.best_config``, keyed
by the kernel's source) and a later start loads it. On torch 2.11 (the H100 machine) two things undo
that: the loaded config loses its ``found_by_coordesc`` mark, so the kernel is tuned once more from it;
and for some kernels the list of starting configs hashes differently at a warm start than it did when
the result was saved, so the saved result is ignored and tuning restarts from another config. Each warm
start then spent seconds tuning and ended on different kernels, often slower ones. ``reuse_tuned_configs``
wraps two Inductor functions, once per process: a result found by coordinate descent for this kernel
source is used whatever starting configs it came from, and a kernel loaded with such a result is not
tuned again. Where those functions do not exist it changes nothing.
"""

import functools


def reuse_tuned_configs() -> bool:
    """Install the wrappers (idempotent); False where Inductor lacks the functions."""
    try:
        from torch._inductor.runtime import autotune_cache
        from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    except ImportError:
        return False
    tune = getattr(CachingAutotuner, "coordinate_descent_tuning", None)
    load = getattr(autotune_cache, "_load_cached_autotuning", None)
    if tune is None or load is None:
        return False
    if not getattr(tune, "kiln_reuses_cached", False):

        @functools.wraps(tune)
        def coordinate_descent_tuning(self, launcher, *args, **kwargs):
            info = getattr(self, "autotune_cache_info", None) or {}
            if info.get("autotune_cache_state") == "hit":
                return launcher  # compiled with the cached best config already
            return tune(self, launcher, *args, **kwargs)

        coordinate_descent_tuning.kiln_reuses_cached = True
        CachingAutotuner.coordinate_descent_tuning = coordinate_descent_tuning
    if not getattr(load, "kiln_reuses_cached", False):

        @functools.wraps(load)
        def _load_cached_autotuning(best_config, configs_hash, configs, inductor_meta):
            if (
                best_config
                and best_config.get("found_by_coordesc")
                and inductor_meta.get("coordinate_descent_tuning")
            ):
                best_config = {**best_config, "configs_hash": configs_hash}
            return load(best_config, configs_hash, configs, inductor_meta)

        _load_cached_autotuning.kiln_reuses_cached = True
        autotune_cache._load_cached_autotuning = _load_cached_autotuning
    return True
