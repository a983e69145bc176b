"""When ``AsyncLLM``'s engine thread hands outputs over, against a worker without a model
(``ConstantWorker``) whose steps a test can hold: a first token never waits for a later step, a
periodic hand-off is posted once the next step has launched (before its device wait), and an event
loop that does not run holds the engine up by at most ``HANDOFF_WAIT`` per hand-off."""

import asyncio
import threading
import time

import pytest
from conftest import tiny_engine_kwargs

from kiln import AsyncLLM, RequestOutputKind, SamplingParams
from kiln.bench.constant_worker import ConstantWorker
from kiln.runtime import engine_thread


class GatedWorker(ConstantWorker):
    """A constant worker whose launches from the ``hold_from``-th on wait until ``gate`` is set;
    ``events`` records each launch and each read-back wait, in order."""

    def __init__(self, num_blocks, block_size, hold_from: int):
        super().__init__(num_blocks, block_size)
        self.hold_from, self.gate = hold_from, threading.Event()
        self.events: list[str] = []

    def execute_model(self, out):
        if self.steps + 1 >= self.hold_from:
            assert self.gate.wait(30), "the test never opened the gate"
        result = super().execute_model(out)
        self.events.append("launch")
        worker = self

        class Clock:
            def synchronize(self):
                worker.events.append("device wait")

        result.host_tokens, result.ready = result.tokens, Clock()
        return result


@pytest.fixture
def engine(tiny_checkpoint):
    engine = AsyncLLM(**tiny_engine_kwargs(tiny_checkpoint("llama"), kv_cache_memory_bytes=2**22))
    yield engine
    engine.shutdown()


def install(engine, hold_from: int = 10**9) -> GatedWorker:
    async def put():
        def swap(llm):
            core = llm.llm_engine
            core.worker = GatedWorker(core.num_blocks, core.config.block_size, hold_from)
            return core.worker

        return await engine._call(swap)

    return asyncio.run(put())


PARAMS = dict(temperature=0, max_tokens=8, ignore_eos=True, detokenize=False)


@pytest.mark.parametrize("kind", [RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA])
def test_a_lone_requests_first_token_does_not_wait_for_a_later_step(engine, monkeypatch, kind):
    """The first token comes with the read-back of step 1 inside step 2; step 3's launch is held
    until the consumer has that token: it must reach the consumer with step 3 not launched. The
    schedule is pinned to a periodic hand-off after every step, so the first token's hand-off is
    also a periodic one (which alone would be posted after the next launch)."""
    monkeypatch.setattr(engine_thread, "HANDOFF_SHARE", 1e9)
    worker = install(engine, hold_from=3)

    async def main():
        params = SamplingParams(**PARAMS, output_kind=kind)
        outs = []
        async for out in engine.generate({"prompt_token_ids": [5, 6, 7]}, params, "lone"):
            if not outs:
                launched = worker.steps
                worker.gate.set()
            outs.append(out)
        return launched, outs

    launched, outs = asyncio.run(asyncio.wait_for(main(), 60))
    assert launched == 2 and outs[0].outputs[0].token_ids == [7]
    tokens = [t for o in outs for t in o.outputs[0].token_ids]
    if kind is RequestOutputKind.DELTA:
        assert tokens == [7] * 8
    else:
        assert outs[-1].outputs[0].token_ids == [7] * 8
    assert outs[-1].finished


def test_a_periodic_hand_off_is_posted_after_the_next_launch_before_its_device_wait(engine, monkeypatch):
    """With a hand-off after every step, each step's tokens (after the first, which goes at once)
    are posted by the next step between its launch and its device wait."""
    monkeypatch.setattr(engine_thread, "HANDOFF_SHARE", 1e9)
    worker = install(engine)
    mailbox_posts: list[int] = []  # len(worker.events) at each post
    from kiln.runtime import request_stream

    post = request_stream.LoopMailbox.post

    def recording_post(self, items, measure=False):
        mailbox_posts.append(len(worker.events))
        return post(self, items, measure)

    monkeypatch.setattr(request_stream.LoopMailbox, "post", recording_post)

    async def main():
        params = SamplingParams(**PARAMS, output_kind=RequestOutputKind.DELTA)
        return [out async for out in engine.generate({"prompt_token_ids": [5, 6, 7]}, params, "p")]

    outs = asyncio.run(asyncio.wait_for(main(), 60))
    assert [len(o.outputs[0].token_ids) for o in outs] == [1] * 8
    events = worker.events
    # the first token's hand-off and the final one go at once; the one before the final is held
    # for a step that launches nothing (the last read-back), so it goes after that step
    *periodic, last = mailbox_posts[1:-1]
    assert len(periodic) == 5, mailbox_posts
    for at in periodic:  # right after a launch, before that step's device wait
        assert events[at - 1] == "launch" and events[at] == "device wait", (at, events)
    assert last == len(events) and events[-2:] == ["device wait", "device wait"], (last, events)


def test_a_busy_event_loop_holds_the_engine_up_at_most_the_hand_off_wait(engine, monkeypatch):
    """While the consumer's event loop is blocked (a synchronous sleep), the engine thread goes on
    stepping: it waits at most ``HANDOFF_WAIT`` for each hand-off the loop does not run; the stream
    then gets every token, in order."""
    monkeypatch.setattr(engine_thread, "HANDOFF_SHARE", 1e9)
    worker = install(engine)
    blocked = 0.3

    async def main():
        params = SamplingParams(**{**PARAMS, "max_tokens": 100}, output_kind=RequestOutputKind.DELTA)
        outs, progress = [], None
        async for out in engine.generate({"prompt_token_ids": [5, 6, 7]}, params, "busy"):
            outs.append(out)
            if progress is None:
                before = worker.steps
                time.sleep(blocked)  # the loop runs nothing meanwhile
                progress = worker.steps - before
        return progress, outs

    progress, outs = asyncio.run(asyncio.wait_for(main(), 60))
    # at most one HANDOFF_WAIT a step here (a hand-off after every step), so the 0.3 s hold up the
    # engine by far less than they would if it waited for the loop: it reaches the end meanwhile
    assert progress >= min(99, blocked / engine_thread.HANDOFF_WAIT / 4), progress
    assert [t for o in outs for t in o.outputs[0].token_ids] == [7] * 100 and outs[-1].finished
