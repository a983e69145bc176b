"""Kernels whose tuned config came from Inductor's autotune cache are not tuned again."""

import pytest

from kiln.compiler.autotune_reuse import reuse_tuned_configs

triton_heuristics = pytest.importorskip("torch._inductor.runtime.triton_heuristics")
autotune_cache = pytest.importorskip("torch._inductor.runtime.autotune_cache")


class _Kernel:
    """Stands in for a CachingAutotuner: only what the wrapper reads."""

    def __init__(self, state):
        self.autotune_cache_info = {"autotune_cache_state": state}


@pytest.fixture
def originals(monkeypatch):
    calls = []

    def tune(self, launcher, *args, **kwargs):
        calls.append(("tune", self.autotune_cache_info["autotune_cache_state"]))
        return "tuned"

    def load(best_config, configs_hash, configs, inductor_meta):
        calls.append(("load", best_config["configs_hash"] == configs_hash))
        return "config"

    monkeypatch.setattr(triton_heuristics.CachingAutotuner, "coordinate_descent_tuning", tune)
    monkeypatch.setattr(autotune_cache, "_load_cached_autotuning", load)
    assert reuse_tuned_configs()
    assert reuse_tuned_configs()  # idempotent: wrapped once
    return calls


def test_cache_hit_skips_coordinate_descent_and_a_miss_still_tunes(originals):
    tune = triton_heuristics.CachingAutotuner.coordinate_descent_tuning
    launcher = object()
    assert tune(_Kernel("hit"), launcher) is launcher
    assert tune(_Kernel("miss"), launcher) == "tuned"
    assert originals == [("tune", "miss")]


def test_tuned_result_is_used_whatever_starting_configs_it_came_from(originals):
    load = autotune_cache._load_cached_autotuning
    tuned = {"configs_hash": "old", "found_by_coordesc": True, "XBLOCK": 1}
    plain = {"configs_hash": "old", "XBLOCK": 1}
    assert load(tuned, "new", [], {"coordinate_descent_tuning": True}) == "config"
    assert load(plain, "new", [], {"coordinate_descent_tuning": True}) == "config"
    assert load(tuned, "new", [], {}) == "config"
    assert originals == [("load", True), ("load", False), ("load", False)]
    assert tuned["configs_hash"] == "old"  # the caller's dict is left as it was
