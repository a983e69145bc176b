"""``kiln.bench.stream_trace``: its wrappers time the hand-off without changing what it does."""

import asyncio
import types

from kiln.bench.stream_trace import StreamTrace
from kiln.runtime.request_stream import LoopMailbox


def test_traced_post_answers_as_post_does():
    """The engine thread waits only on the mailboxes whose ``post`` was taken (``_post_deferred``): under
    the trace ``post`` must still say so, or the traced runs would never wait."""
    async_llm = types.SimpleNamespace(_engine=types.SimpleNamespace(submit=lambda fn, on_dead=None: fn()))
    llm = types.SimpleNamespace(llm_engine=types.SimpleNamespace(step=lambda: []))
    trace = StreamTrace(async_llm)
    open_loop, closed_loop = asyncio.new_event_loop(), asyncio.new_event_loop()
    closed_loop.close()
    try:
        with trace.installed(llm):
            assert LoopMailbox(open_loop).post([]) is True
            assert LoopMailbox(closed_loop).post([]) is False
        assert len(trace.posts) == 2 and all(end is not None for _, end in trace.posts)
        assert LoopMailbox.post.__name__ == "post"  # unwrapped again
    finally:
        open_loop.close()
