"""What ``LLM.get_metrics()`` returns: vLLM's metric objects (``vllm.v1.metrics.reader``), read from a
Prometheus registry.

Counters come back as ``Counter`` (``value`` an int), gauges as ``Gauge``, histograms as ``Histogram``
(``count``, ``sum`` and ``buckets``: upper bound as a string, e.g. ``"0.5"`` or ``"+Inf"``, to the
cumulative count of observations up to it). ``Vector`` exists for scripts written against vLLM,
which uses it for speculative-decoding counters only; kiln reports none.
"""

from dataclasses import dataclass

from prometheus_client import CollectorRegistry


@dataclass
class Metric:
    """One metric with one set of labels (a metric name may appear once per label set)."""

    name: str
    labels: dict[str, str]


@dataclass
class Counter(Metric):
    """A monotonically increasing integer counter."""

    value: int


@dataclass
class Vector(Metric):
    """An ordered array of integer counters."""

    values: list[int]


@dataclass
class Gauge(Metric):
    """A numerical value that can go up or down."""

    value: float


@dataclass
class Histogram(Metric):
    """Observations in buckets: ``buckets`` maps each upper bound to the cumulative count up to it."""

    count: int
    sum: float
    buckets: dict[str, int]


def snapshot(registry: CollectorRegistry, prefix: str = "vllm:") -> list[Metric]:
    """Every counter, gauge and histogram of ``registry`` whose name starts with ``prefix``."""
    collected: list[Metric] = []
    for family in registry.collect():
        if not family.name.startswith(prefix):
            continue
        if family.type == "gauge":
            collected += [Gauge(family.name, s.labels, s.value) for s in family.samples]
        elif family.type == "counter":
            collected += [
                Counter(family.name, s.labels, int(s.value))
                for s in family.samples
                if s.name == family.name + "_total"
            ]
        elif family.type == "histogram":
            collected += _histograms(family)
    return collected


def _histograms(family) -> list[Histogram]:
    by_labels: dict[frozenset, Histogram] = {}

    def entry(labels: dict[str, str]) -> Histogram:
        key = frozenset(labels.items())
        if key not in by_labels:
            by_labels[key] = Histogram(family.name, dict(labels), 0, 0.0, {})
        return by_labels[key]

    for s in family.samples:
        if s.name == family.name + "_bucket":
            labels = {k: v for k, v in s.labels.items() if k != "le"}
            entry(labels).buckets[s.labels["le"]] = int(s.value)
        elif s.name == family.name + "_count":
            entry(s.labels).count = int(s.value)
        elif s.name == family.name + "_sum":
            entry(s.labels).sum = s.value
    return list(by_labels.values())
