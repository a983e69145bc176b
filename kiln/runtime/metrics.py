"""Engine statistics under vLLM's Prometheus metric names, collected when ``LLM(disable_log_stats=False)``.

The engine calls ``on_token`` for every generated token it accepts, ``on_abort`` with the sequences
it drops and ``on_step`` after every step; ``on_step`` adds the step's prompt and generation tokens to
their counters, copies the scheduler's and the KV-cache manager's running totals (preemptions,
prefix-cache queries and hits, in tokens) and their state (running / waiting sequences, KV-cache
usage) into the registry, then lets the stats logger log.

As in vLLM (which runs each of a request's ``n`` samples as a child request), every sequence counts
as one request: its prompt tokens are counted once, when its first token arrives (a preempted and
recomputed sequence is not counted again), its time to first token is measured from the request's
arrival, and every later token gives one inter-token latency (the time since the sequence's
previous token). The metric names and labels (``model_name``, ``engine``) are vLLM's, so scripts
and dashboards written for vLLM read them unchanged; each ``LLM`` has its own registry.
"""

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge as PromGauge
from prometheus_client import Histogram as PromHistogram

from kiln.runtime.metrics_reader import Metric, snapshot
from kiln.runtime.stats_logger import StatsLogger

FINISH_REASONS = ("stop", "length", "abort")
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
TTFT_BUCKETS += [20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
ITL_BUCKETS += [20.0, 40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0]
REQUEST_LATENCY_BUCKETS += [60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]


def buckets_1_2_5(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return out
            out.append(m * scale)
        scale *= 10


class MetricsCollector:
    def __init__(self, model_name: str, max_model_len: int, log_stats_interval: float | None = None):
        self.registry = registry = CollectorRegistry()
        labels = {"model_name": model_name, "engine": "0"}
        names = list(labels)

        def gauge(name, doc):
            return PromGauge(name, doc, names, registry=registry).labels(**labels)

        def counter(name, doc):
            return PromCounter(name, doc, names, registry=registry).labels(**labels)

        def histogram(name, doc, buckets):
            return PromHistogram(name, doc, names, registry=registry, buckets=buckets).labels(**labels)

        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemptions.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.prefix_queries = counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
        )
        self.prefix_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        success = PromCounter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            names + ["finished_reason"],
            registry=registry,
        )
        self.success = {r: success.labels(**labels, finished_reason=r) for r in FINISH_REASONS}
        token_buckets = buckets_1_2_5(max_model_len)
        self.ttft = histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.itl = histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", token_buckets
        )
        # running totals, also read by the stats logger
        self.num_prompt_tokens = self.num_generation_tokens = 0
        self._counted_prompt_tokens = self._counted_generation_tokens = 0  # already in the counters
        self.num_preemptions = self.num_prefix_queries = self.num_prefix_hits = 0
        self.num_running = self.num_waiting = 0
        self.kv_cache_usage = 0.0
        self._last_token_time: dict = {}  # sequence -> time its previous token was accepted
        self.logger = StatsLogger(self, log_stats_interval)

    # ------------------------------------------------------------------ engine hooks

    def on_token(self, arrival_time: float, seq, index: int, now: float) -> None:
        """Output token ``index`` of ``seq`` was accepted at ``now`` (its finish reason already set)."""
        if index == 0:
            self.ttft.observe(now - arrival_time)
            self.num_prompt_tokens += seq.num_prompt_tokens
        else:
            self.itl.observe(now - self._last_token_time[seq])
        self.num_generation_tokens += 1
        if seq.finish_reason is None:
            self._last_token_time[seq] = now
            return
        self._last_token_time.pop(seq, None)
        self.success[seq.finish_reason].inc()
        self.e2e.observe(now - arrival_time)
        self.queue_time.observe(seq.first_scheduled_time - arrival_time)
        self.request_prompt_tokens.observe(seq.num_prompt_tokens)
        self.request_generation_tokens.observe(index + 1)

    def on_pooled(self, arrival_time: float, seq, now: float) -> None:
        """A pooling request finished at ``now``: its prompt was computed, nothing generated."""
        self.num_prompt_tokens += seq.num_prompt_tokens
        self.success["stop"].inc()
        self.e2e.observe(now - arrival_time)
        self.queue_time.observe(seq.first_scheduled_time - arrival_time)
        self.request_prompt_tokens.observe(seq.num_prompt_tokens)

    def on_abort(self, seqs, scheduler, kv) -> None:
        """``seqs`` were dropped unfinished (an interrupted ``generate``); the state is updated too."""
        for seq in seqs:
            self._last_token_time.pop(seq, None)
            self.success["abort"].inc()
        self.on_step(scheduler, kv)

    def on_step(self, scheduler, kv) -> None:
        """After a step: this step's token counts, the scheduler's and the KV cache's totals and state."""
        self.prompt_tokens.inc(self.num_prompt_tokens - self._counted_prompt_tokens)
        self.generation_tokens.inc(self.num_generation_tokens - self._counted_generation_tokens)
        self._counted_prompt_tokens, self._counted_generation_tokens = (
            self.num_prompt_tokens,
            self.num_generation_tokens,
        )
        self.preemptions.inc(scheduler.num_preemptions - self.num_preemptions)
        self.prefix_queries.inc(kv.queries - self.num_prefix_queries)
        self.prefix_hits.inc(kv.hits - self.num_prefix_hits)
        self.num_preemptions, self.num_prefix_queries, self.num_prefix_hits = (
            scheduler.num_preemptions,
            kv.queries,
            kv.hits,
        )
        self.num_running, self.num_waiting = len(scheduler.running), len(scheduler.waiting)
        self.kv_cache_usage = 1.0 - kv.num_free_blocks / kv.pool.num_blocks
        self.running.set(self.num_running)
        self.waiting.set(self.num_waiting)
        self.kv_usage.set(self.kv_cache_usage)
        self.logger.maybe_log()

    def snapshot(self) -> list[Metric]:
        return snapshot(self.registry)
