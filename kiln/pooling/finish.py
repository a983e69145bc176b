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
def task_outputs(model, items) -> list[torch.Tensor]:
    """Each ``(PoolingState, pooled rows)``'s task output (float32, on the device), computed in groups
    of equal parameters."""
    groups: dict[tuple, list[int]] = {}
    for i, (s, _) in enumerate(items):
        groups.setdefault((s.task, s.dimensions, s.use_activation, s.pooling != "ALL"), []).append(i)
    results: list[torch.Tensor | None] = [None] * len(items)
    for (task, dims, act, per_sequence), members in groups.items():
        if per_sequence:
            x = torch.stack([items[i][1] for i in members])
            out = finish_task(x, model.score, model.spec, task, dims, act)
            for j, i in enumerate(members):
                results[i] = out[j]
        else:
            for i in members:
                results[i] = finish_task(items[i][1], model.score, model.spec, task, dims, act)
    return results


class PooledOutputs:
    """Pooling requests of an engine, and their ``PoolingRequestOutput``s (see module doc)."""

    def __init__(self):
        self.requests: dict[str, tuple[list[int], float]] = {}  # id -> (prompt token ids, arrival time)
        self.in_flight: deque[_InFlight] = deque()

    def add_request(self, request_id: str, prompt_token_ids: list[int]) -> None:
        self.requests[request_id] = (prompt_token_ids, time.time())

    def has_pending(self) -> bool:
        return bool(self.in_flight)

    def clear(self) -> None:
        self.requests.clear()
        self.in_flight.clear()

    def drain(self) -> list[PoolingRequestOutput]:
        """Every output still on its way (waits for the device)."""
        outputs = []
        while self.in_flight:
            outputs += self.in_flight.popleft().outputs()
        return outputs

    def finish(self, engine, pooled: dict[int, torch.Tensor]) -> list[PoolingRequestOutput]:
        """Finish the sequences whose pooled rows the step returned; return the outputs of earlier
        steps (on CUDA) or of this one (on CPU)."""
        earlier = self.drain()
        if not pooled:
            return earlier
        items, requests, now = [], [], time.time()
        for seq_id, rows in pooled.items():
            seq = engine.seqs.pop(seq_id)
            engine.kv.cache_computed_blocks(seq)
            engine.scheduler.finish(seq)
            prompt_ids, arrival = self.requests.pop(seq.request_id)
            if engine.stats is not None:
                engine.stats.on_pooled(arrival, seq, now)
            items.append((seq.pooling, rows))
            requests.append((seq.request_id, prompt_ids, seq.num_cached_tokens or 0))
        results = task_outputs(engine.model, items)
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
