"""LLM(disable_log_stats=False) logs a one-line stats summary every KILN_LOG_STATS_INTERVAL seconds."""

import logging
import re

import pytest

from kiln import LLM, SamplingParams
from kiln.envs import DEFAULT_LOG_STATS_INTERVAL as DEFAULT_INTERVAL
from kiln.envs import log_stats_interval

PARAMS = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [100 + i, 200, 300]} for i in range(3)]
LINE = re.compile(
    r"Engine 000: Avg prompt throughput: [\d.]+ tokens/s, Avg generation throughput: [\d.]+ tokens/s, "
    r"Running: \d+ reqs, Waiting: \d+ reqs, KV cache usage: [\d.]+%, Prefix cache hit rate: [\d.]+%"
)


def stats_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kiln.stats" and r.levelno == logging.INFO]


def test_stats_line_logged_during_generate(tiny_checkpoint, caplog, monkeypatch):
    monkeypatch.setenv("KILN_LOG_STATS_INTERVAL", "0")  # every step
    caplog.set_level(logging.INFO, logger="kiln.stats")
    with LLM(tiny_checkpoint("llama"), enforce_eager=True, dtype="float32", disable_log_stats=False) as llm:
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    lines = stats_lines(caplog)
    assert lines and all(LINE.fullmatch(line) for line in lines)
    assert any("Running: 3 reqs" in line for line in lines)


def test_no_stats_line_by_default_or_within_the_interval(tiny_checkpoint, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG, logger="kiln.stats")
    with LLM(tiny_checkpoint("llama"), enforce_eager=True, dtype="float32") as llm:
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    monkeypatch.setenv("KILN_LOG_STATS_INTERVAL", "3600")
    with LLM(tiny_checkpoint("llama"), enforce_eager=True, dtype="float32", disable_log_stats=False) as llm:
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert not [r for r in caplog.records if r.name == "kiln.stats"]


def test_interval_knob(monkeypatch):
    monkeypatch.delenv("KILN_LOG_STATS_INTERVAL", raising=False)
    assert log_stats_interval() == DEFAULT_INTERVAL == 10.0
    monkeypatch.setenv("KILN_LOG_STATS_INTERVAL", "2.5")
    assert log_stats_interval() == 2.5
    for bad in ("-1", "soon", "nan"):
        monkeypatch.setenv("KILN_LOG_STATS_INTERVAL", bad)
        with pytest.raises(ValueError, match="KILN_LOG_STATS_INTERVAL"):
            log_stats_interval()


def test_line_is_visible_without_logging_configuration(monkeypatch):
    from kiln.runtime import stats_logger

    fresh = logging.Logger("kiln.stats")  # outside the hierarchy: no handler anywhere, no level
    monkeypatch.setattr(stats_logger, "logger", fresh)
    stats_logger._make_visible()
    assert fresh.isEnabledFor(logging.INFO) and len(fresh.handlers) == 1
    stats_logger._make_visible()  # configured once
    assert len(fresh.handlers) == 1
    configured = logging.Logger("kiln.stats")
    configured.setLevel(logging.WARNING)  # the application chose a level: left alone
    monkeypatch.setattr(stats_logger, "logger", configured)
    stats_logger._make_visible()
    assert not configured.handlers and not configured.isEnabledFor(logging.INFO)
