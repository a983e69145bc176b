"""Memory figures measured by a cold start are reused by a warm start with the same name, and only then."""

from kiln.compiler.cache import CompileCache
from kiln.runtime.kv_profile import measurement_name, recorded_or_measured


def test_recorded_figure_replaces_the_measurement(tmp_path):
    cache = CompileCache(str(tmp_path), {"model": "m"})
    calls = []

    def measure():
        calls.append(1)
        return 1234

    name = measurement_name("activation_peak_bytes", {"tokens": 256, "attention": "triton"})
    assert recorded_or_measured(cache, name, measure) == (1234, "measured")
    assert recorded_or_measured(cache, name, lambda: 999) == (1234, "recorded")
    assert CompileCache(str(tmp_path), {"model": "m"}).measurement(name) == 1234  # on disk
    other = measurement_name("activation_peak_bytes", {"tokens": 512, "attention": "triton"})
    assert recorded_or_measured(cache, other, lambda: 77) == (77, "measured")
    assert recorded_or_measured(None, name, lambda: 5) == (5, "measured")  # no cache: always measured
    assert len(calls) == 1


def test_names_follow_the_spec_and_the_allocator(monkeypatch):
    spec = {"tokens": 256, "logit_rows": 8}
    base = measurement_name("activation_peak_bytes", spec)
    assert base == measurement_name("activation_peak_bytes", dict(reversed(list(spec.items()))))
    assert base != measurement_name("activation_peak_bytes", {**spec, "logit_rows": 9})
    assert base != measurement_name("cuda_graph_bytes", spec)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert base != measurement_name("activation_peak_bytes", spec)
