"""The engine's step hook for pooling requests.

A sequence whose last prompt chunk has just run is finished at once: its full blocks are published
to the prefix cache, then its KV blocks freed. The outputs of all such sequences of a step are built
together: the head and post-processing run on the device per task, and the results come to the host
in one copy. On CUDA that copy goes to pinned memory behind the step's own kernels and the outputs
are handed out one step later, after the next step is launched, so building them never leaves the
device idle; on CPU they are handed out at once.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from kiln.pooling.heads import finish_task
from kiln.pooling.outputs import PoolingOutput, PoolingRequestOutput


@dataclass
class _InFlight:
    """One step's pooled outputs on their way to the host."""

    host: torch.Tensor  # flat float32 results (pinned on CUDA), valid once ``ready`` has passed
    ready: torch.cuda.Event | None
    shapes: list[torch.Size]
    requests: list[tuple[str, list[int], int]]  # (request id, prompt token ids, cached tokens)

    def outputs(self) -> list[PoolingRequestOutput]:
        if self.ready is not None:
            self.ready.synchronize()
        result, offset = [], 0
        for shape, (request_id, prompt_ids, cached) in zip(self.shapes, self.requests):
            size = shape.numel()
            data = self.host[offset : offset + size].view(shape)
            offset += size
            result.append(PoolingRequestOutput(request_id, PoolingOutput(data), prompt_ids, cached, True))
        return result


@torch.inference_mode()
def task_outputs(model, states) -> list[torch.Tensor]:
    """Each state's task output (float32, on the device), computed in groups of equal parameters."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(states):
        groups.setdefault((s.task, s.dimensions, s.use_activation, s.pooling != "ALL"), []).append(i)
    results: list[torch.Tensor | None] = [None] * len(states)
    for (task, dims, act, per_sequence), members in groups.items():
        if per_sequence:
            out = finish_task(
                torch.stack([states[i].pooled for i in members]), model.score, model.spec, task, dims, act
            )
            for j, i in enumerate(members):
                results[i] = out[j]
        else:
            for i in members:
                results[i] = finish_task(states[i].pooled, model.score, model.spec, task, dims, act)
    return results


class PooledOutputs:
    """Finishes pooling sequences and hands out their ``PoolingRequestOutput``s (see module doc)."""

    def __init__(self, model):
        self.model = model
        self.in_flight: deque[_InFlight] = deque()

    def has_pending(self) -> bool:
        return bool(self.in_flight)

    def clear(self) -> None:
        self.in_flight.clear()

    def drain(self) -> list[PoolingRequestOutput]:
        """Every output still on its way (waits for the device)."""
        outputs = []
        while self.in_flight:
            outputs += self.in_flight.popleft().outputs()
        return outputs

    def finish(self, engine, batch) -> list[PoolingRequestOutput]:
        """Finish the batch's pooling sequences whose whole prompt is now computed; return the outputs
        of earlier steps (on CUDA) or of this one (on CPU)."""
        earlier = self.drain()
        done = [
            seq
            for seq in batch.seqs
            if seq.pooling is not None and seq.num_computed_tokens == seq.num_prompt_tokens
        ]
        if not done:
            return earlier
        requests, now = [], time.time()
        for seq in done:
            engine.kv.cache_computed_blocks(seq)
            engine.scheduler.finish(seq)
            request = engine.requests.pop(seq.request_id)
            if engine.stats is not None:
                engine.stats.on_pooled(request.arrival_time, seq, now)
            requests.append((request.request_id, request.prompt_token_ids, seq.num_cached_tokens or 0))
        results = task_outputs(self.model, [seq.pooling for seq in done])
        flat = torch.cat([r.reshape(-1) for r in results])
        shapes = [r.shape for r in results]
        if flat.is_cuda:
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            self.in_flight.append(_InFlight(host, ready, shapes, requests))
            return earlier
        return earlier + _InFlight(flat, None, shapes, requests).outputs()
