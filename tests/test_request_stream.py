"""``AsyncLLM``'s hand-off from the engine thread to the consumers' event loops, without an engine:
``LoopMailbox`` (one wake-up of the loop for everything posted before it runs the hand-off, order
kept, a closed loop ignored, a loop in debug mode served through a callback) and ``RequestStream``
(a waiting consumer is woken, one that is behind takes what is queued, a cancelled one is left
alone; CUMULATIVE snapshots stay as they were handed out)."""

import asyncio
import threading
import time

import pytest

from kiln.runtime.outputs import CompletionOutput, RequestOutput
from kiln.runtime.request_stream import LoopMailbox, RequestStream
from kiln.runtime.sampling_params import RequestOutputKind


def output(request_id: str, tokens: list[int], finished: bool = False, index: int = 0) -> RequestOutput:
    sample = CompletionOutput(index, "", tokens, None, None)
    return RequestOutput(request_id, None, None, None, [sample], finished)


class CountingLoop:
    """Counts ``call_soon_threadsafe`` calls of the running loop."""

    def __init__(self, loop):
        self.calls = 0
        inner = loop.call_soon_threadsafe

        def counted(*args, **kwargs):
            self.calls += 1
            return inner(*args, **kwargs)

        loop.call_soon_threadsafe = counted


def test_posts_before_the_dispatch_wake_the_loop_once_and_keep_their_order():
    async def main():
        loop = asyncio.get_running_loop()
        counter = CountingLoop(loop)
        box = LoopMailbox(loop)
        a, b = RequestStream("a", box), RequestStream("b", box)

        def engine():  # three steps posted before the loop gets a turn
            for step in range(3):
                box.post([(a, output("a", [step])), (b, output("b", [10 + step]))])

        thread = threading.Thread(target=engine)
        thread.start()
        thread.join()
        woken_once = counter.calls
        got_a = [(await a.get()).outputs[0].token_ids for _ in range(3)]
        got_b = [(await b.get()).outputs[0].token_ids for _ in range(3)]  # queued: no wait
        box.post([(a, output("a", [4]))])  # the wake-up is still pending: none more
        still_once = counter.calls
        await asyncio.sleep(0)  # the loop runs the pending hand-off
        box.post([(a, output("a", [3], finished=True))])  # after it: a new wake-up
        assert (await a.get()).outputs[0].token_ids == [4]
        last = await a.get()
        return woken_once, still_once, got_a, got_b, last, counter.calls

    woken_once, still_once, got_a, got_b, last, calls = asyncio.run(main())
    assert woken_once == 1 and still_once == 1 and calls == 2
    assert got_a == [[0], [1], [2]] and got_b == [[10], [11], [12]]
    assert last.finished and last.outputs[0].token_ids == [3]


@pytest.mark.parametrize("debug", [False, True])
def test_many_posts_from_a_thread_reach_a_slow_consumer_in_order(debug):
    """Also with the loop in debug mode (it checks the calling thread): the callback path."""

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_debug(debug)
        box = LoopMailbox(loop)
        streams = [RequestStream(str(i), box) for i in range(4)]

        def engine():
            for step in range(500):
                box.post([(s, output(s.request_id, [step], finished=step == 499)) for s in streams])

        async def consume(stream, pause):
            got = []
            while True:
                item = await stream.get()
                got += item.outputs[0].token_ids
                if item.finished:
                    return got
                if pause and len(got) % 50 == 0:
                    await asyncio.sleep(0.001)  # falls behind: the items wait in its queue

        thread = threading.Thread(target=engine)
        thread.start()
        results = await asyncio.gather(*(consume(s, i % 2 == 1) for i, s in enumerate(streams)))
        thread.join()
        return results

    for got in asyncio.run(main()):
        assert got == list(range(500))


def test_a_closed_loop_is_ignored_and_a_cancelled_consumer_is_not_woken():
    loop = asyncio.new_event_loop()
    box = LoopMailbox(loop)
    stream = RequestStream("r", box)
    loop.close()
    box.post([(stream, output("r", [1]))])  # no error: nobody listens
    box.post([(stream, output("r", [2]))])
    assert not stream.items

    async def main():
        box = LoopMailbox(asyncio.get_running_loop())
        stream = RequestStream("c", box)
        task = asyncio.create_task(stream.get())
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        stream.put(output("c", [5]))  # its waiter is cancelled: not set again
        return task.cancelled(), stream.waiter, (await stream.get()).outputs[0].token_ids

    cancelled, waiter, tokens = asyncio.run(main())
    assert cancelled and waiter is None and tokens == [5]


def test_cumulative_outputs_are_snapshots():
    stream = RequestStream("r", LoopMailbox(asyncio.new_event_loop()))
    stream.start("p", [1, 2], RequestOutputKind.CUMULATIVE)
    first = stream.on_step(output("r", [7]), None)
    second = stream.on_step(output("r", [8]), None)
    delta = output("r", [9])
    delta.outputs.append(CompletionOutput(1, "", [4], None, None))  # a second sample joins
    third = stream.on_step(delta, None)
    assert first.outputs[0].token_ids == [7] and second.outputs[0].token_ids == [7, 8]
    assert [(c.index, c.token_ids) for c in third.outputs] == [(0, [7, 8, 9]), (1, [4])]
    assert third.prompt == "p" and third.prompt_token_ids == [1, 2]
    final = output("r", [7, 8, 9, 10], finished=True)
    assert stream.on_step(None, final) is final


def test_stream_interval_joins_delta_outputs():
    stream = RequestStream("r", LoopMailbox(asyncio.new_event_loop()))
    stream.start(None, [1], RequestOutputKind.DELTA, interval=3)
    sent = [stream.on_step(output("r", [t]), None) for t in range(1, 8)]
    final = output("r", list(range(1, 10)), finished=True)
    last = stream.on_step(output("r", [8, 9]), final)  # the last step gave two tokens
    got = [o.outputs[0].token_ids for o in sent if o is not None] + [last.outputs[0].token_ids]
    assert got == [[1], [2, 3, 4], [5, 6, 7], [8, 9]]  # the first at once, then every 3 tokens
    assert last.finished and sum(got, []) == final.outputs[0].token_ids


def test_stream_interval_skips_cumulative_outputs():
    stream = RequestStream("r", LoopMailbox(asyncio.new_event_loop()))
    stream.start(None, [1], RequestOutputKind.CUMULATIVE, interval=2)
    sent = [stream.on_step(output("r", [t]), None) for t in range(1, 6)]
    assert [o.outputs[0].token_ids for o in sent if o is not None] == [[1], [1, 2, 3], [1, 2, 3, 4, 5]]


def test_an_abort_hands_over_what_the_interval_held_back():
    stream = RequestStream("r", LoopMailbox(asyncio.new_event_loop()))
    stream.start(None, [1], RequestOutputKind.DELTA, interval=4)
    assert stream.on_step(output("r", [1]), None) is not None
    assert stream.on_step(output("r", [2]), None) is None
    aborted = output("r", [1, 2], finished=True)
    aborted.outputs[0].finish_reason = "abort"
    last = stream.on_abort(aborted)
    assert last.outputs[0].token_ids == [2] and last.outputs[0].finish_reason == "abort"


def test_the_mailbox_measures_the_loop_cpu_of_a_dispatch_and_the_consumers_it_woke():
    """``LoopMailbox.cost``: the loop thread's CPU seconds from the dispatch until the consumers it
    woke have run (the engine thread spaces its hand-offs by it); a consumer's work counts, the time
    the loop then idles does not."""

    def spin(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    async def main():
        loop = asyncio.get_running_loop()
        box = LoopMailbox(loop)
        streams = [RequestStream(str(i), box) for i in range(3)]

        async def consume(stream):
            item = await stream.get()
            spin(0.02)  # the consumer's own work on the output
            return item

        tasks = [asyncio.create_task(consume(s)) for s in streams]
        await asyncio.sleep(0)  # every consumer waits
        items = [(s, output(s.request_id, [1])) for s in streams]
        threading.Thread(target=box.post, args=(items, True)).start()  # measured
        await asyncio.gather(*tasks)
        await asyncio.sleep(0.05)  # idle: not counted
        return box.cost

    cost = asyncio.run(main())
    assert 0.06 <= cost < 0.1
