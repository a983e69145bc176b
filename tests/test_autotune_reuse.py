"""Kernels whose tuned config came from Inductor's autotune cache are not tuned again."""

import pytest

from kiln.compiler.autotune_reuse import reuse_tuned_configs

triton_heuristics = pytest.importorskip("torch._inductor.runtime.triton_heuristics")


class _Kernel:
    """Stands in for a CachingAutotuner: only what the wrapper reads."""

    def __init__(self, state):
        self.autotune_cache_info = {"autotune_cache_state": state}


def test_cache_hit_skips_coordinate_descent_and_a_miss_still_tunes(monkeypatch):
    autotuner = triton_heuristics.CachingAutotuner
    calls = []

    def original(self, launcher, *args, **kwargs):
        calls.append(self.autotune_cache_info["autotune_cache_state"])
        return "tuned"

    monkeypatch.setattr(autotuner, "coordinate_descent_tuning", original)
    assert reuse_tuned_configs()
    assert reuse_tuned_configs()  # idempotent: wrapped once
    launcher = object()
    assert autotuner.coordinate_descent_tuning(_Kernel("hit"), launcher) is launcher
    assert autotuner.coordinate_descent_tuning(_Kernel("miss"), launcher) == "tuned"
    assert calls == ["miss"]
