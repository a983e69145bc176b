"""The one-line stats summary ``LLM(disable_log_stats=False)`` logs during ``generate``.

Every ``KILN_LOG_STATS_INTERVAL`` seconds (default 10, vLLM's interval; ``kiln.envs.log_stats_interval``)
an engine step logs, on the ``kiln.stats`` logger at INFO (DEBUG while idle), the prompt and
generation throughput since the previous line, running and waiting requests, KV-cache usage and the
prefix-cache hit rate since start-up. If nothing would show an INFO record of that logger (no
handler anywhere and no level set), a stderr handler is attached to it, so the line appears as in vLLM.
"""

import logging
import time

from kiln.envs import log_stats_interval

logger = logging.getLogger("kiln.stats")


def _make_visible() -> None:
    if logger.level == logging.NOTSET and not logger.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class StatsLogger:
    def __init__(self, stats, interval: float | None = None):
        self.stats = stats  # a MetricsCollector
        self.interval = log_stats_interval() if interval is None else interval
        self.last_time = time.monotonic()
        self.last_prompt_tokens = self.last_generation_tokens = 0
        _make_visible()

    def maybe_log(self) -> None:
        now = time.monotonic()
        if now - self.last_time < self.interval:
            return
        s, elapsed = self.stats, now - self.last_time
        prompt = s.num_prompt_tokens - self.last_prompt_tokens
        generation = s.num_generation_tokens - self.last_generation_tokens
        self.last_time, self.last_prompt_tokens, self.last_generation_tokens = (
            now,
            s.num_prompt_tokens,
            s.num_generation_tokens,
        )
        rate = (lambda n: n / elapsed) if elapsed > 0 else (lambda n: 0.0)
        hit_rate = s.num_prefix_hits / s.num_prefix_queries if s.num_prefix_queries else 0.0
        level = logging.INFO if prompt or generation or s.num_running or s.num_waiting else logging.DEBUG
        logger.log(
            level,
            "Engine 000: Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
            "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
            rate(prompt),
            rate(generation),
            s.num_running,
            s.num_waiting,
            s.kv_cache_usage * 100,
            hit_rate * 100,
        )
