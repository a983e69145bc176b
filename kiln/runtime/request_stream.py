"""One streamed request of ``AsyncLLM``: turns the engine's per-step deltas into the outputs its
``output_kind`` asks for, and carries them to the consumer's event loop.

The engine thread calls ``on_step`` / ``on_abort`` / ``fail``; each returns what to hand over (or
None), and ``AsyncLLM`` puts it on ``queue`` through the consumer's loop (``loop.call_soon_threadsafe``).

- ``CUMULATIVE``: every output holds everything so far (the deltas aggregated); the last is the
  request's final output.
- ``DELTA``: every output holds what the step added (text held back while a stop string may still cut
  it, see ``OutputProcessor.step_deltas``); the last carries the final metrics.
- ``FINAL_ONLY``: only the final output.
"""

import asyncio
from dataclasses import replace

from kiln.runtime.outputs import CompletionOutput, RequestOutput
from kiln.runtime.sampling_params import RequestOutputKind


def _copy(output: RequestOutput) -> RequestOutput:
    """A snapshot the consumer may keep while the engine goes on aggregating."""
    outputs = [
        replace(
            c,
            token_ids=list(c.token_ids),
            logprobs=None if c.logprobs is None else list(c.logprobs),
        )
        for c in output.outputs
    ]
    return replace(output, outputs=outputs)


class RequestStream:
    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id, self.loop = request_id, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.kind = RequestOutputKind.CUMULATIVE
        self.prompt: str | None = None
        self.prompt_token_ids: list[int] | None = None
        self._aggregate: RequestOutput | None = None

    def start(self, prompt: str | None, prompt_token_ids: list[int], kind: RequestOutputKind) -> None:
        self.prompt, self.prompt_token_ids, self.kind = prompt, prompt_token_ids, kind

    def on_step(self, delta: RequestOutput | None, final: RequestOutput | None) -> RequestOutput | None:
        """The output to hand over after a step that gave this request ``delta`` (None: no new
        tokens) and, when it finished, its ``final`` output."""
        if delta is not None:
            delta.prompt, delta.prompt_token_ids = self.prompt, self.prompt_token_ids
        if final is not None:
            if self.kind is RequestOutputKind.DELTA and delta is not None:
                delta.finished, delta.metrics = True, final.metrics
                delta.num_cached_tokens = final.num_cached_tokens
                return delta
            return final
        if delta is None or self.kind is RequestOutputKind.FINAL_ONLY:
            return None
        if self.kind is RequestOutputKind.DELTA:
            return delta
        if self._aggregate is None:
            self._aggregate = _copy(delta)
        else:
            self._aggregate.add(_copy(delta), aggregate=True)
        return _copy(self._aggregate)

    def on_abort(self, output: RequestOutput) -> RequestOutput:
        """The last output of a request aborted by ``AsyncLLM.abort``: finish reason ``"abort"``
        (for ``DELTA``, with nothing new)."""
        if self.kind is RequestOutputKind.DELTA:
            empty = [
                CompletionOutput(c.index, "", [], c.cumulative_logprob, None, c.finish_reason, c.stop_reason)
                for c in output.outputs
            ]
            output = replace(output, outputs=empty, prompt_logprobs=None)
        return output
