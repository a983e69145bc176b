"""A worker without a model, for measuring the host side of kiln: every row that samples gets token 7.

With ``step_seconds`` > 0 it stands in for a device that runs one step in that time, serially and
asynchronously: ``execute_model`` returns at once, and reading a step's tokens back waits (sleeping,
so the GIL is free meanwhile, as it is in a CUDA event wait) until the simulated device has finished
it. Host work that outlasts the simulated step then shows up as lost throughput, as it does on a GPU.

``launch_ops`` > 0 adds that many tiny torch operations to each ``execute_model``: a stand-in for a
real launch's host work, which calls torch many times, each call letting go of the GIL for a moment
(the moments another thread waiting for the GIL may take it).
"""

import time

import torch

from kiln.runtime.step_data import RunnerOutput, SchedulerOutput


class DeviceClock:
    """``synchronize()`` returns once the simulated device has run the step (the ``ready`` event of a
    ``RunnerOutput``)."""

    def __init__(self, done_at: float):
        self.done_at = done_at

    def synchronize(self) -> None:
        wait = self.done_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)


class ConstantWorker:
    """Samples token 7 for every row that samples; holds nothing."""

    def __init__(self, num_blocks: int, block_size: int, step_seconds: float = 0.0, launch_ops: int = 0):
        if step_seconds < 0:
            raise ValueError(f"step_seconds must be >= 0, got {step_seconds}")
        if launch_ops < 0:
            raise ValueError(f"launch_ops must be >= 0, got {launch_ops}")
        self.num_blocks, self.block_size, self.step_seconds = num_blocks, block_size, step_seconds
        self.launch_ops = launch_ops
        self._scratch = torch.zeros(1)
        self.asleep: set[str] = set()
        self.sleep_level = 0
        self.steps = 0
        self._device_free_at = 0.0  # when the simulated device finishes the steps launched so far

    def execute_model(self, out: SchedulerOutput) -> RunnerOutput:
        self.steps += 1
        ids = [s.seq_id for s in out.scheduled if s.sample]
        tokens = torch.full((len(ids),), 7, dtype=torch.long)
        scratch = self._scratch
        for _ in range(self.launch_ops):
            scratch.add_(1.0)
        if self.step_seconds == 0:
            return RunnerOutput(ids, tokens, [None] * len(ids), {})
        self._device_free_at = max(time.perf_counter(), self._device_free_at) + self.step_seconds
        ready = DeviceClock(self._device_free_at)
        return RunnerOutput(ids, tokens, [None] * len(ids), {}, host_tokens=tokens, ready=ready)

    def shutdown(self) -> None:
        """Nothing to free."""
