"""``LLM(profiler_config=...)``, ``LLM.start_profile()`` / ``stop_profile()``: profiling the engine steps.

``ProfilerConfig`` has vLLM's field names and checks. With ``profiler="torch"`` the steps between
``start_profile(prefix)`` and ``stop_profile()`` run under ``torch.profiler``, each inside a
``kiln::step`` record; the trace is written as Chrome/Perfetto JSON (gzipped unless
``torch_profiler_use_gzip=False``) to ``torch_profiler_dir`` as
``<prefix>_dp0_pp0_tp0.<ns>.pt.trace.json[.gz]`` (``dp0_pp0_tp0.<ns>...`` without a prefix), plus an
op table ``profiler_out_0.txt`` when ``torch_profiler_dump_cuda_time_total`` is on. With
``profiler="cuda"`` the same steps are bracketed by ``cudaProfilerStart/Stop`` (for
``nsys profile --capture-range=cudaProfilerApi``), each step an NVTX range ``kiln::step``.

``delay_iterations`` steps are skipped before recording starts, ``max_iterations`` (0: no limit)
ends recording after that many recorded steps, and ``wait_iterations`` / ``warmup_iterations`` /
``active_iterations`` make a ``torch.profiler.schedule`` (only when wait or warmup is set, as in
vLLM). kiln runs in one process, so ``ignore_frontend`` has nothing to ignore and changes nothing.
"""

import contextlib
import logging
import os
import time
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

logger = logging.getLogger("kiln")

HOW_TO_ENABLE = (
    "create the LLM with profiler_config={'profiler': 'torch', 'torch_profiler_dir': '/path/to/traces'}"
)
STEP_MARKER = "kiln::step"


class ProfilerConfig(BaseModel):
    """vLLM's ``ProfilerConfig``: which profiler runs over the engine steps, and how."""

    model_config = ConfigDict(extra="forbid")

    profiler: Literal["torch", "cuda"] | None = None
    torch_profiler_dir: str = ""
    torch_profiler_with_stack: bool = True
    torch_profiler_with_flops: bool = False
    torch_profiler_use_gzip: bool = True
    torch_profiler_dump_cuda_time_total: bool = True
    torch_profiler_record_shapes: bool = False
    torch_profiler_with_memory: bool = False
    capture_torch_profiler: Literal[False] = False  # profiling CUDA-graph capture: not implemented
    detailed_trace_annotation: Literal[False] = False  # roofline annotations: not implemented
    ignore_frontend: bool = False
    delay_iterations: int = Field(default=0, ge=0)
    max_iterations: int = Field(default=0, ge=0)
    warmup_iterations: int = Field(default=0, ge=0)
    active_iterations: int = Field(default=5, ge=1)
    wait_iterations: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check(self):
        if self.torch_profiler_dir and self.profiler != "torch":
            raise ValueError("torch_profiler_dir is only applicable when profiler is set to 'torch'")
        if self.profiler == "torch" and not self.torch_profiler_dir:
            raise ValueError("torch_profiler_dir must be set when profiler is 'torch'")
        if self.torch_profiler_dir:
            self.torch_profiler_dir = os.path.abspath(os.path.expanduser(self.torch_profiler_dir))
        return self

    @classmethod
    def parse(cls, value: Any) -> "ProfilerConfig":
        """Build from what ``LLM(profiler_config=...)`` accepts: None, a dict or a ``ProfilerConfig``."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value.model_copy()
        if not isinstance(value, dict):
            raise ValueError(
                f"profiler_config must be a dict or a ProfilerConfig, got {type(value).__name__}"
            )
        try:
            return cls.model_validate(value)
        except ValidationError as e:
            raise ValueError(_describe(e)) from None

    @property
    def schedule_steps(self) -> int:
        """Steps a torch.profiler schedule spends before recording (0 without a schedule)."""
        return self.wait_iterations + self.warmup_iterations

    def check_device(self, device: torch.device) -> None:
        if self.profiler == "cuda" and device.type != "cuda":
            raise ValueError("profiler_config: profiler 'cuda' needs a CUDA device; use 'torch'")


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r} (valid keys: {', '.join(ProfilerConfig.model_fields)})")
        elif key in ("capture_torch_profiler", "detailed_trace_annotation"):
            lines.append(f"{key}: kiln implements only False (got {item.get('input')!r})")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {msg} (got {item.get('input')!r})" if key else msg)
    return "profiler_config: " + "; ".join(lines)


class EngineProfiler:
    """Runs the configured profiler over the engine steps between ``start`` and ``stop``."""

    def __init__(self, config: ProfilerConfig, device: torch.device):
        self.config, self.device = config, device
        self.active = False  # between start() and stop()
        self.running = False  # recording (after any delay, before max_iterations)
        self._steps_seen = self._steps_recorded = 0
        self._torch: torch.profiler.profile | None = None
        self._name = ""
        self.last_trace: str | None = None  # path of the last trace written

    def start(self, profile_prefix: str | None = None) -> None:
        if self.config.profiler is None:
            raise RuntimeError(f"start_profile(): profiling is not enabled; {HOW_TO_ENABLE}")
        if profile_prefix is not None and (
            not isinstance(profile_prefix, str) or not profile_prefix or os.sep in profile_prefix
        ):
            raise ValueError(
                f"profile_prefix must be a non-empty file-name prefix without {os.sep!r}, "
                f"got {profile_prefix!r}"
            )
        if self.active:
            logger.debug("start_profile() while the profiler is already active: ignored")
            return
        self._name = f"{profile_prefix}_dp0_pp0_tp0" if profile_prefix else "dp0_pp0_tp0"
        self.active = True
        self._steps_seen = self._steps_recorded = 0
        self.last_trace = None
        if self.config.delay_iterations == 0:
            try:
                self._begin()
            except BaseException:
                self.active = False
                raise

    def stop(self) -> None:
        if not self.active:
            logger.debug("stop_profile() while the profiler is not active: ignored")
            return
        self.active = False
        if self.running:
            self._end()

    @contextlib.contextmanager
    def step(self):
        """Context of one engine step: recorded as ``kiln::step`` while the profiler runs."""
        if not self.running:
            yield
        elif self._torch is not None:
            with torch.profiler.record_function(STEP_MARKER):
                yield
        else:
            torch.cuda.nvtx.range_push(STEP_MARKER)
            try:
                yield
            finally:
                torch.cuda.nvtx.range_pop()
        if self.active:
            self._after_step()

    def _after_step(self) -> None:
        cfg = self.config
        if self.running:
            if self._torch is not None and cfg.schedule_steps:
                self._torch.step()
            self._steps_recorded += 1
            recorded = self._steps_recorded - (cfg.schedule_steps if self._torch is not None else 0)
            if cfg.max_iterations and recorded >= cfg.max_iterations:
                logger.info("profiler: max_iterations=%d reached, stopping", cfg.max_iterations)
                self._end()
            return
        self._steps_seen += 1
        if self._steps_seen == cfg.delay_iterations and self._steps_recorded == 0:
            self._begin()

    def _begin(self) -> None:
        cfg = self.config
        if cfg.profiler == "cuda":
            torch.cuda.profiler.start()
        else:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            schedule = None
            if cfg.schedule_steps:
                schedule = torch.profiler.schedule(
                    wait=cfg.wait_iterations,
                    warmup=cfg.warmup_iterations,
                    active=cfg.active_iterations,
                    repeat=1,
                )
            self._torch = torch.profiler.profile(
                activities=activities,
                schedule=schedule,
                record_shapes=cfg.torch_profiler_record_shapes,
                profile_memory=cfg.torch_profiler_with_memory,
                with_stack=cfg.torch_profiler_with_stack,
                with_flops=cfg.torch_profiler_with_flops,
                on_trace_ready=self._write_trace,
            )
            self._torch.start()
        self.running = True

    def _end(self) -> None:
        self.running = False
        if self.config.profiler == "cuda":
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            return
        prof, self._torch = self._torch, None
        prof.stop()
        if self.config.torch_profiler_dump_cuda_time_total and self.last_trace is not None:
            cuda = self.device.type == "cuda"
            try:
                table = prof.key_averages().table(
                    sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                    row_limit=None if cuda else 50,
                )
            except UnicodeDecodeError as e:  # torch's own parse of an event name; the trace is written
                table = f"op table unavailable: torch.profiler could not decode an event name ({e})"
                logger.warning("profiler: %s", table)
            path = os.path.join(self.config.torch_profiler_dir, "profiler_out_0.txt")
            with open(path, "w") as f:
                print(table, file=f)

    def _write_trace(self, prof: torch.profiler.profile) -> None:
        directory = self.config.torch_profiler_dir
        os.makedirs(directory, exist_ok=True)
        name = f"{self._name}.{time.time_ns()}.pt.trace.json"
        if self.config.torch_profiler_use_gzip:
            name += ".gz"
        path = os.path.join(directory, name)
        prof.export_chrome_trace(path)
        self.last_trace = path
        logger.info("profiler: trace written to %s", path)

    def shutdown(self) -> None:
        if self.active:
            self.stop()
