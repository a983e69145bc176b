"""One timeline of start-up, phase by phase, from process start to the first token.

The worker records each phase it runs (``Worker.timeline``); the compile phases come from the compile
report (Dynamo, passes, Inductor or cache load, the warm-up runs that launch Triton's kernels); ``LLM``
adds the import (process start to the end of ``import kiln``) and the configuration (arguments, checkpoint
config, tokenizer) and logs one line when the engine is ready; the first step adds ``first_token``. The
same dict is ``compile_report().timeline`` and what ``kiln bench compile`` writes.
"""

import logging
import os
import time
from contextlib import contextmanager

logger = logging.getLogger("kiln")

PHASES = (
    "import",
    "config",
    "weight_load",
    "compiler_import",  # a compiled start-up importing Dynamo and Inductor (kiln/compiler/imports.py)
    "dynamo",
    "passes",
    "inductor",
    "cache_load",
    "triton_warmup",
    "kv_profile",
    "kv_allocate",
    "graph_capture",
    "other",  # the rest of LLM(): hashing the cache key, building the runner, the scheduler, ...
    "first_token",  # the first step: forward, sampling, and whatever compiled lazily in it
)

_imported_at: float | None = None  # wall-clock time at the end of ``import kiln``


def mark_imported() -> None:
    global _imported_at
    if _imported_at is None:
        _imported_at = time.time()


def process_start_time() -> float | None:
    """Wall-clock time this process started (Linux ``/proc``; None elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # starttime, field 22 of stat (two fields precede the parenthesis)
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


class StartupTimeline:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.ready = False  # LLM() returned: later phases (a wake-up's capture) are not start-up
        self.ready_s: float | None = None  # process start to the end of LLM()
        self.llm_s: float | None = None  # LLM() alone

    def add(self, phase: str, seconds: float) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown start-up phase {phase!r}; phases are {PHASES}")
        if not self.ready or phase == "first_token":
            self.seconds[phase] = self.seconds.get(phase, 0.0) + max(0.0, seconds)

    @contextmanager
    def phase(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)

    def finish(self, llm_started: float, config_s: float) -> None:
        """``LLM()`` is done: ``llm_started`` is its ``time.perf_counter()`` at entry, ``config_s`` the part
        before the engine. Adds import, config and the unattributed rest, then logs the start-up line."""
        self.llm_s = time.perf_counter() - llm_started
        start = process_start_time()
        if start is not None and _imported_at is not None:
            self.seconds["import"] = max(0.0, _imported_at - start)
            self.ready_s = time.time() - start
        self.add("config", config_s)
        attributed = sum(v for k, v in self.seconds.items() if k not in ("import", "first_token"))
        self.add("other", self.llm_s - attributed)
        self.ready = True
        logger.info("kiln start-up: %s", self.summary())

    def to_dict(self) -> dict:
        phases = {p: round(self.seconds[p], 4) for p in PHASES if p in self.seconds}
        return {"phases_s": phases, "llm_s": self.llm_s, "ready_s": self.ready_s}

    def summary(self) -> str:
        ready = f"ready {self.ready_s:.2f}s after process start" if self.ready_s is not None else "ready"
        llm = f", LLM() {self.llm_s:.2f}s" if self.llm_s is not None else ""
        parts = ", ".join(f"{p} {self.seconds[p]:.2f}" for p in PHASES if p in self.seconds)
        return f"{ready}{llm} ({parts})"
