"""One streamed request of ``AsyncLLM``: turns the engine's per-step deltas into the outputs its
``output_kind`` asks for, and carries them to the consumer's event loop.

The engine thread calls ``on_step`` / ``on_abort``; each returns what to hand over (or None). What the
engine thread hands over (after a step, or after a few joined: ``kiln/runtime/engine_thread.py``), for
every stream of one event loop, goes to that loop's ``LoopMailbox`` in one ``post``: each item onto its
stream, each waiting consumer's future resolved, and one ``call_soon_threadsafe`` to wake the loop
(none while an earlier wake-up is still pending), whose next pass runs the woken consumers. A consumer
that is behind takes what is queued without waiting. Every hand-off's output reaches the consumer, in
order. The mailbox also measures what a hand-off costs the loop thread (``cost``), which the engine
thread spaces its periodic hand-offs by.

- ``CUMULATIVE``: every output holds everything so far (the deltas aggregated); the last is the
  request's final output.
- ``DELTA``: every output holds what the hand-off added (text held back while a stop string may still cut
  it, see ``OutputProcessor.step_deltas``); the last carries the final metrics.
- ``FINAL_ONLY``: only the final output.

With ``stream_interval`` > 1 (an engine argument) a stream gets its first output at once, then one
each time that many more tokens have come (DELTA outputs joined, CUMULATIVE ones skipped), and the
final one: fewer outputs, each worth more tokens, for less host work per token.
"""

import asyncio
import threading
import time
from collections import deque
from dataclasses import replace

from kiln.runtime.outputs import CompletionOutput, RequestOutput
from kiln.runtime.sampling_params import RequestOutputKind


class LoopMailbox:
    """Items for the streams of one event loop, handed over from other threads."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        # guards every stream's ``items`` / ``waiter`` of this loop, and orders the posts
        self.lock = threading.Lock()
        # asyncio's own loops take the items straight from the posting thread (``post``); others
        # (uvloop, ...) through a callback run on the loop
        self._direct = isinstance(loop, asyncio.BaseEventLoop)
        self._due = False  # a wake-up of the loop is pending: its last callback (``_end``) has not run
        # the loop thread's CPU seconds from the start of the last measured hand-off until the
        # consumers it woke had run (what handing a batch of outputs over costs there), read by the
        # engine thread
        self.cost = 0.0
        self._cpu_at_start = 0.0
        self.handed = threading.Event()  # set once a hand-off's woken consumers have run

    def post(self, items: list, measure: bool = False) -> bool:
        """Any thread: hand ``(stream, item)`` pairs to the loop; False if the loop is closed (they
        are dropped). ``measure``: time what the hand-off costs the loop (``cost``).

        On asyncio's loops the items go onto their streams here, and each waiting consumer's future is
        resolved here too: its wake-up joins the loop's ready callbacks, and one
        ``call_soon_threadsafe`` (none while one is pending) wakes the loop, whose next pass runs the
        consumers themselves. Resolving the futures on the loop instead would cost every hand-off a
        second pass of the loop (a selector call) before any consumer runs. This relies on CPython's
        asyncio: a loop's ready queue is a deque (appending to it is atomic under the GIL) and a
        future is resolved in one C call; a loop in debug mode, which checks the calling thread,
        takes the callback path."""
        loop = self.loop
        if loop.is_closed():  # the consumer's event loop is gone: nobody is listening
            return False
        with self.lock:
            try:
                if not self._direct or loop.get_debug():
                    loop.call_soon_threadsafe(self._dispatch, items, measure)
                    return True
                if measure:
                    loop.call_soon(self._start)  # ahead of the consumers' wake-ups
                self._deliver(items)
                if self._due:  # the loop will run the pending ``_end``, and these after it
                    loop.call_soon(self._end, measure)
                else:
                    self._due = True
                    loop.call_soon_threadsafe(self._end, measure)
            except RuntimeError:  # the loop closed meanwhile
                return False
        return True

    def deliver(self, items: list) -> None:
        """Each item onto its stream (any thread); every consumer that waits is woken."""
        with self.lock:
            self._deliver(items)

    @staticmethod
    def _deliver(items: list) -> None:  # the lock held
        for stream, item in items:
            stream.items.append(item)
            waiter = stream.waiter
            if waiter is not None:
                stream.waiter = None
                try:
                    waiter.set_result(None)
                except asyncio.InvalidStateError:  # the consumer was cancelled: it is not woken
                    pass

    def _dispatch(self, items: list, measure: bool) -> None:
        """On the loop (loops other than asyncio's): ``deliver``, timed as ``post`` times it."""
        if measure:
            self._start()
        self.deliver(items)
        self.loop.call_soon(self._end, measure)  # after the consumers just woken have run

    def _start(self) -> None:
        self._cpu_at_start = time.thread_time()

    def _end(self, measure: bool) -> None:
        self._due = False
        if measure:
            self.cost = time.thread_time() - self._cpu_at_start
        self.handed.set()


class RequestStream:
    def __init__(self, request_id: str, mailbox: LoopMailbox):
        self.request_id, self.mailbox = request_id, mailbox
        self.loop = mailbox.loop
        # outputs (or an error) not yet taken by the consumer; appended under the mailbox's lock
        self.items: deque = deque()
        self.waiter: asyncio.Future | None = None  # set while the consumer waits for an item
        self.kind = RequestOutputKind.CUMULATIVE
        self.prompt: str | None = None
        self.prompt_token_ids: list[int] | None = None
        self.interval = 1
        self._aggregate: RequestOutput | None = None  # CUMULATIVE: everything so far (engine thread)
        self._sent = 0  # CUMULATIVE: tokens of the longest sample in the last output handed over
        self._held: RequestOutput | None = None  # DELTA with an interval: joined deltas not yet sent
        self._sent_any = False  # DELTA with an interval: the first output went out

    # ------------------------------------------------------------------ the consumer's loop

    def put(self, item) -> None:
        """Queue an output or an error; wake the consumer if it waits."""
        self.mailbox.deliver([(self, item)])

    async def get(self):
        """The next output or error, in order (waits only when none is queued)."""
        with self.mailbox.lock:
            if self.items:
                return self.items.popleft()
            waiter = self.waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self.waiter = None
        return self.items.popleft()

    # ------------------------------------------------------------------ the engine thread

    def start(
        self,
        prompt: str | None,
        prompt_token_ids: list[int],
        kind: RequestOutputKind,
        interval: int = 1,
    ) -> None:
        """``interval`` (``stream_interval``): hand over an output once this many tokens have come
        since the last one (the first and the final output at once)."""
        self.prompt, self.prompt_token_ids, self.kind = prompt, prompt_token_ids, kind
        self.interval = interval

    def on_step(self, delta: RequestOutput | None, final: RequestOutput | None) -> RequestOutput | None:
        """The output to hand over after a step that gave this request ``delta`` (None: no new
        tokens) and, when it finished, its ``final`` output."""
        if self.interval > 1 and self.kind is RequestOutputKind.DELTA:
            delta = self._hold(delta, final)
            if delta is None and final is None:
                return None
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
        aggregate = self._aggregate
        if aggregate is None:  # the first delta's lists are its own: the aggregate keeps them
            self._aggregate = aggregate = delta
        else:
            _extend(aggregate, delta)
            if self.interval > 1 and not self._due(aggregate):
                return None
        self._sent = max(len(c.token_ids) for c in aggregate.outputs)
        return _snapshot(aggregate)

    def _hold(self, delta: RequestOutput | None, final: RequestOutput | None) -> RequestOutput | None:
        """DELTA with an interval: ``delta`` joined to what is held back; the joined delta when it
        is due (the first, ``interval`` tokens, or the final), else None (held)."""
        held = self._held
        if held is None:
            held = delta
        elif delta is not None:
            _extend(held, delta)
        if held is None:
            return None
        if final is None and self._sent_any and max(len(c.token_ids) for c in held.outputs) < self.interval:
            self._held = held
            return None
        self._held, self._sent_any = None, True
        return held

    def _due(self, aggregate: RequestOutput) -> bool:
        """CUMULATIVE with an interval: ``interval`` tokens since the last output."""
        return max(len(c.token_ids) for c in aggregate.outputs) - self._sent >= self.interval

    def on_abort(self, output: RequestOutput) -> RequestOutput:
        """The last output of a request aborted by ``AsyncLLM.abort``: finish reason ``"abort"``
        (for ``DELTA``, with nothing new)."""
        if self.kind is RequestOutputKind.DELTA:  # what is held back (with an interval), else nothing
            held = {c.index: c for c in self._held.outputs} if self._held is not None else {}
            outputs = []
            for c in output.outputs:
                h = held.get(c.index)
                text, tokens, logprobs = (
                    (h.text, h.token_ids, h.logprobs) if h is not None else ("", [], None)
                )
                outputs.append(
                    CompletionOutput(
                        c.index, text, tokens, c.cumulative_logprob, logprobs, c.finish_reason, c.stop_reason
                    )
                )
            prompt_logprobs = self._held.prompt_logprobs if self._held is not None else None
            self._held = None
            output = replace(output, outputs=outputs, prompt_logprobs=prompt_logprobs)
        return output


def _extend(aggregate: RequestOutput, delta: RequestOutput) -> None:
    """Append a later delta of the same request to ``aggregate`` in place (its lists are its own)."""
    by_index = {c.index: c for c in aggregate.outputs}
    for new in delta.outputs:
        old = by_index.get(new.index)
        if old is None:
            aggregate.outputs.append(replace(new, token_ids=list(new.token_ids)))
            continue
        old.text += new.text
        old.token_ids.extend(new.token_ids)
        if new.logprobs is not None:
            if old.logprobs is None:
                old.logprobs = []
            old.logprobs.extend(new.logprobs)
        old.cumulative_logprob = new.cumulative_logprob
        old.finish_reason, old.stop_reason = new.finish_reason, new.stop_reason
    if len(aggregate.outputs) > 1:
        aggregate.outputs.sort(key=lambda c: c.index)


def _snapshot(output: RequestOutput) -> RequestOutput:
    """A copy the consumer may keep while the engine goes on aggregating."""
    outputs = [
        CompletionOutput(
            c.index,
            c.text,
            c.token_ids[:],
            c.cumulative_logprob,
            None if c.logprobs is None else c.logprobs[:],
            c.finish_reason,
            c.stop_reason,
            c.lora_request,
        )
        for c in output.outputs
    ]
    return replace(output, outputs=outputs)
