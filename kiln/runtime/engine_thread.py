"""The thread that owns an ``LLM`` for ``AsyncLLM``: it builds it, runs every call into it, and steps it.

Other threads never touch the engine: they hand over commands (``submit``: a function run on this
thread with the ``LLM``) through a thread-safe queue. Between steps the thread takes every waiting
command (adds, aborts, control calls), so requests that arrive together join the same continuous
batch; with nothing to run it blocks on the queue. After a step it routes the deltas and finished
outputs to the requests' streams, in one hand-off per event loop (``LoopMailbox.post``).

Handing outputs over costs host time on both threads (building the deltas here, waking every consumer
on the loop), and the two threads share the GIL, so that time comes out of the engine's steps. The
thread therefore hands over at most so often that this cost stays near ``HANDOFF_SHARE`` of the wall
time: after a hand-off that cost C seconds (here, plus the loop thread's CPU for the dispatch and the
consumer steps it woke, ``LoopMailbox.cost``), the next waits until C / ``HANDOFF_SHARE`` has passed
(at most ``MAX_HANDOFF_DELAY``), the deltas of the steps between joined into one per request. When
handing over is cheap against a step (few streams, or a slow device step) that is every step. A
request's first tokens and its end never wait (time to first token, and the final output), and neither
does anything when the engine has nothing else to run.

Where a periodic hand-off (nothing urgent in it) lands matters as much: the loop thread needs the GIL
for it, and a launch lets the GIL go at every torch call, so a loop woken at a random moment takes it
in the middle of the next launch (the device then waits for the host) and the two threads trade it
back and forth, each trade a thread wake-up. Such a hand-off is therefore posted by the next step
once it has launched its work, before it waits for the device (``LLMEngine.before_device_wait``), and
the thread then waits, the GIL free, until the loop has run the consumers it woke (at most
``HANDOFF_WAIT``; a loop busy elsewhere does not hold the engine up longer): the loop's work for it
runs in one piece while the device runs the step just launched.

Pausing stops admitting requests (they are held until resumed); requests already in the engine are
aborted or, with ``wait_for_inflight_requests``, run to completion first.
"""

import gc
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from kiln.runtime.outputs import RequestOutput
from kiln.runtime.request_stream import LoopMailbox, RequestStream

logger = logging.getLogger("kiln")

HANDOFF_SHARE = 0.03  # the wall-time share of handing outputs over that the thread aims at
MAX_HANDOFF_DELAY = 0.02  # seconds a stream's new tokens wait at most for a hand-off
HANDOFF_WAIT = 0.002  # seconds the thread waits at most for a loop to run a periodic hand-off (0: none)


def freeze_startup_heap() -> None:
    """Collect, then move every object alive now (the model, torch's and kiln's modules: hundreds
    of thousands) out of the garbage collector's reach: a full collection otherwise walks them all
    (a quarter of a second for the tiny model on a CPU), which serving triggers every few hundred
    steps (streaming allocates a few objects per stream and step), stalling every stream meanwhile.
    The freeze is process-wide; ``gc.unfreeze()`` when the engine thread ends gives them back."""
    gc.collect()
    gc.freeze()


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shut down, or a step failed): no request can be served."""


class EngineThread:
    def __init__(self, build: Callable[[], Any]):
        """``build()`` makes the ``LLM`` (on the thread); its error, if any, is raised here."""
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self.streams: dict[str, RequestStream] = {}  # requests in the engine (this thread only)
        self.held: list[tuple[RequestStream, Any, Any]] = []  # added while paused
        self.paused = False
        self.dead_error: BaseException | None = None
        self.failed = False  # the loop stopped on an error (not a shutdown)
        self._drain_waiters: list[Callable[[], None]] = []  # run once nothing is in flight
        self._stop = False
        self._next_handoff = 0.0  # perf_counter time before which only urgent outputs are handed over
        self._deferred: dict[LoopMailbox, list] | None = None  # a hand-off held for the next device wait
        self._lock = threading.Lock()  # a command is either queued before the loop dies or refused
        self.llm = None
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._main, args=(build, ready), name="kiln-engine", daemon=True
        )
        self._thread.start()
        ready.wait()
        if self.llm is None:
            self._thread.join()
            raise self.dead_error

    # ------------------------------------------------------------------ any thread

    def submit(self, fn: Callable[[], None], on_dead: Callable[[BaseException], None] | None = None) -> None:
        """Run ``fn()`` on the engine thread; ``on_dead(error)`` instead if the loop has stopped."""
        with self._lock:
            if self.dead_error is None:
                self._commands.put((fn, on_dead))
                return
        if on_dead is not None:
            on_dead(self.dead_error)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.dead_error is None

    def stop(self) -> None:
        """Abort everything, shut the ``LLM`` down and end the thread (waits for it)."""
        if threading.current_thread() is self._thread:
            self._stop = True
        elif self._thread.is_alive():
            self._commands.put((self._request_stop, None))
            self._thread.join()

    # ------------------------------------------------------------------ the engine thread

    def _request_stop(self) -> None:
        self._stop = True

    def _main(self, build, ready: threading.Event) -> None:
        try:
            self.llm = build()
            self.llm.llm_engine.enable_step_deltas()  # each step's new tokens go to the streams
        except BaseException as e:  # raised by the constructor
            self.dead_error = e
            ready.set()
            return
        freeze_startup_heap()
        ready.set()
        error: BaseException = EngineDeadError("the engine was shut down")
        try:
            self._loop()
        except BaseException as e:  # a failed step: every request gets it
            logger.exception("the engine loop failed")
            self.failed = True
            error = EngineDeadError(f"the engine loop failed: {e!r}")
            error.__cause__ = e
        finally:
            with self._lock:
                self.dead_error = error
            self._fail_everything(error)
            try:
                self.llm.shutdown()
            finally:
                gc.unfreeze()
                self._fail_commands(error)

    def _loop(self) -> None:
        engine = self.llm.llm_engine
        while not self._stop:
            if self._drain_waiters and not engine.has_unfinished_requests():
                waiters, self._drain_waiters = self._drain_waiters, []
                for done in waiters:
                    done()
            self._run_commands(block=not engine.has_unfinished_requests() and not self._drain_waiters)
            if self._stop:
                return
            if engine.has_unfinished_requests():
                self._step()

    def _run_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return
        while True:
            fn, _ = command
            fn()
            if self._stop:
                return
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> None:
        engine = self.llm.llm_engine
        finished = engine.step()
        self._post_deferred()  # the step launched nothing (no device wait): they go now
        start = time.perf_counter()
        running = engine.has_unfinished_requests()
        urgent = bool(finished) or engine.processor.has_urgent_deltas
        if start >= self._next_handoff or not running:
            deltas, full = engine.step_deltas(), True
        elif urgent:  # first tokens and ends go at once
            deltas, full = engine.step_deltas(urgent=True), False
        else:
            return
        if not deltas and not finished:
            return
        posts = self._route(deltas, finished)
        if full and running and not urgent:
            # a periodic hand-off, nothing urgent in it: posted once the next step has launched its
            # work, before that step waits for the device, so that the loop thread's work for it
            # (waking the consumers, under the shared GIL) overlaps the device's instead of the host's
            self._deferred = posts
            engine.before_device_wait = self._post_deferred
        else:  # the loop's cost is measured for the spacing of the hand-offs while requests run
            measure = full and running
            for mailbox, items in posts.items():
                mailbox.post(items, measure)
        if full:
            loop_cost = max((mailbox.cost for mailbox in posts), default=0.0)
            now = time.perf_counter()
            delay = (now - start + loop_cost) / HANDOFF_SHARE
            self._next_handoff = now + min(delay, MAX_HANDOFF_DELAY)

    def _post_deferred(self) -> None:
        """Post the hand-off held for the next device wait (any post to a stream goes after it),
        then let the loop threads run it: wait (the GIL free) until each has run the consumers it
        woke, at most ``HANDOFF_WAIT``."""
        posts = self._deferred
        if posts is None:
            return
        self._deferred = None
        self.llm.llm_engine.before_device_wait = None
        taken = []
        for mailbox, items in posts.items():
            mailbox.handed.clear()
            if mailbox.post(items, measure=True):
                taken.append(mailbox)
        if HANDOFF_WAIT <= 0:  # 0: post and go on
            return
        deadline = time.perf_counter() + HANDOFF_WAIT
        for mailbox in taken:
            mailbox.handed.wait(max(0.0, deadline - time.perf_counter()))

    def _route(self, deltas: list[RequestOutput], finished: list[RequestOutput]) -> dict[LoopMailbox, list]:
        """Each delta and finished output through its stream: per event loop, the items to hand over."""
        streams = self.streams
        finals = {out.request_id: out for out in finished} if finished else None
        posts: dict[LoopMailbox, list] = {}  # one hand-off per event loop
        for delta in deltas:
            request_id = delta.request_id
            stream = streams.get(request_id)
            if stream is None:
                continue
            final = finals.pop(request_id, None) if finals else None
            if final is not None:
                del streams[request_id]
            item = stream.on_step(delta, final)
            if item is not None:
                items = posts.get(stream.mailbox)
                if items is None:
                    posts[stream.mailbox] = [(stream, item)]
                else:
                    items.append((stream, item))
        for request_id, final in (finals or {}).items():  # finished with no new token since
            stream = streams.pop(request_id, None)
            if stream is not None:
                posts.setdefault(stream.mailbox, []).append((stream, stream.on_step(None, final)))
        return posts

    def abort(self, request_id: str, stream: RequestStream | None, notify: bool) -> bool:
        """Drop a request (held or in the engine); ``stream``: only if it is that one. ``notify``: hand
        the stream its aborted output. Whether anything was aborted."""
        self._post_deferred()  # what the stream got before goes first
        for i, (held, _, _) in enumerate(self.held):
            if held.request_id == request_id and stream in (None, held):
                del self.held[i]
                if notify:  # it never reached the engine: an output with nothing in it
                    held.mailbox.post([(held, RequestOutput(request_id, None, None, None, [], True))])
                return True
        current = self.streams.get(request_id)
        if current is None or stream not in (None, current):
            return False
        del self.streams[request_id]
        engine = self.llm.llm_engine
        items = []
        if notify:  # the tokens not handed over yet go first
            for delta in engine.step_deltas(request_id=request_id):
                item = current.on_step(delta, None)
                if item is not None:
                    items.append((current, item))
        output = engine.abort_request(request_id)
        if notify and output is not None:
            items.append((current, current.on_abort(output)))
        if items:
            current.mailbox.post(items)
        return True

    def abort_all(self) -> None:
        for request_id in list(self.streams):
            self.abort(request_id, None, notify=True)

    def _fail_everything(self, error: BaseException) -> None:
        self._post_deferred()  # what the streams got before goes first
        streams = list(self.streams.values()) + [s for s, _, _ in self.held]
        self.streams, self.held = {}, []
        for stream in streams:
            stream.mailbox.post([(stream, error)])

    def _fail_commands(self, error: BaseException) -> None:
        while True:
            try:
                _, on_dead = self._commands.get_nowait()
            except queue.Empty:
                return
            if on_dead is not None:
                on_dead(error)
