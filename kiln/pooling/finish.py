"""The engine's step hook for pooling requests: a sequence whose last prompt chunk has just run is
finished at once (its full blocks published to the prefix cache, then its KV blocks freed), and the
outputs of all such sequences of the step are built together: the head and post-processing run on the
device per task, and everything comes to the host in one copy."""

from __future__ import annotations

import torch

from kiln.pooling.heads import finish_task
from kiln.pooling.outputs import PoolingOutput, PoolingRequestOutput


@torch.inference_mode()
def pooled_outputs(model, states) -> list[torch.Tensor]:
    """Each state's task output on the host (float32), computed on the device in groups."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(states):
        seq_task = s.pooling != "ALL"
        groups.setdefault((s.task, s.dimensions, s.use_activation, seq_task), []).append(i)
    results: list[torch.Tensor | None] = [None] * len(states)
    for (task, dims, act, seq_task), members in groups.items():
        if seq_task:
            x = torch.stack([states[i].pooled for i in members])
            out = finish_task(x, model.score, model.spec, task, dims, act)
            for j, i in enumerate(members):
                results[i] = out[j]
        else:
            for i in members:
                results[i] = finish_task(states[i].pooled, model.score, model.spec, task, dims, act)
    flat = torch.cat([r.reshape(-1) for r in results]).cpu()
    host, offset = [], 0
    for r in results:
        host.append(flat[offset : offset + r.numel()].view(r.shape))
        offset += r.numel()
    return host


def finish_pooled_sequences(engine, batch) -> list[PoolingRequestOutput]:
    """Finish the batch's pooling sequences whose whole prompt is now computed; return their outputs."""
    done = [
        seq
        for seq in batch.seqs
        if seq.pooling is not None and seq.num_computed_tokens == seq.num_prompt_tokens
    ]
    if not done:
        return []
    for seq in done:
        engine.kv.cache_computed_blocks(seq)
        engine.scheduler.finish(seq)
    data = pooled_outputs(engine.model, [seq.pooling for seq in done])
    outputs = []
    for seq, tensor in zip(done, data):
        request = engine.requests.pop(seq.request_id)
        outputs.append(
            PoolingRequestOutput(
                request.request_id,
                PoolingOutput(tensor),
                request.prompt_token_ids,
                seq.num_cached_tokens or 0,
                True,
            )
        )
    return outputs
