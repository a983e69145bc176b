"""Where the time of a streamed request goes: timestamps of ``AsyncLLM``'s hand-offs, for
``benchmarks/streaming.py``.

``StreamTrace`` wraps (while installed, on one ``AsyncLLM``) the engine thread's ``submit``, the
commands it runs, ``LLMEngine.step`` and ``LoopMailbox.post`` / ``_start`` / ``_end``, and
stamps each with ``time.perf_counter()`` (and the engine thread's CPU clock around a step). From the
stamps:

- ``ttft_phases``: one streamed first token, phase by phase: the consumer's call to ``submit``
  (``submit``), the engine thread taking the command (``pickup``: the loop-to-engine hop), adding the
  request (``add``), until its first step starts (``to_first_step``), the steps (``steps``), routing
  the output (``route``), ``post`` itself, the event loop starting the hand-off (``loop_wake``: the
  engine-to-loop hop) and the consumer getting the output (``to_consumer``).
- ``generate_phases``: the same for a one-token ``LLM.generate`` on the engine thread: before its first
  step (``prepare``), the steps, after the last (``finish``).
- ``step_summary``: the engine's steps during a streamed run, split by whether a hand-off's dispatch
  ran on the loop while the step ran (the GIL is shared: that step pays for it), against the steps of
  ``generate``: wall and engine-thread CPU per step, and the engine thread's time off the CPU per step
  (waiting for the GIL, or for a device wait that sleeps).
- ``handoffs``: per hand-off, the engine's routing and posting, the wait until the loop starts the
  hand-off (its dispatch: ``LoopMailbox._start``), and the loop thread's wall and CPU time from there
  until the consumers it woke have run (``_end``).

The wrappers cost a few microseconds each (and every hand-off is measured, so that its start on the
loop is stamped), so the traced repeats run apart from the timed ones.
"""

import statistics
import time
from contextlib import contextmanager

from kiln.runtime import request_stream


def _median_ms(values: list[float]) -> float | None:
    return round(statistics.median(values) * 1e3, 4) if values else None


class StreamTrace:
    def __init__(self, async_llm):
        self.async_llm = async_llm
        self.reset()

    def reset(self) -> None:
        self.submits: list[float] = []  # loop thread, at engine.submit
        self.pickups: list[tuple[float, float]] = []  # engine thread: (command start, command end)
        self.steps: list[tuple[float, float, float]] = []  # (start, end, engine-thread CPU seconds)
        self.posts: list[list] = []  # engine thread: [post called, post returned (None until then)]
        self.dispatches: list[list[float]] = []  # loop: [start, end of the woken consumers, CPU seconds]

    @contextmanager
    def installed(self, llm):
        """Wrap the hooks (``llm``: the ``LLM``, on the engine thread's side) until the block ends."""
        engine_thread, core = self.async_llm._engine, llm.llm_engine
        submit, step = engine_thread.submit, core.step
        mailbox = request_stream.LoopMailbox
        post, start_handoff, end_handoff = mailbox.post, mailbox._start, mailbox._end
        clock, cpu = time.perf_counter, time.thread_time
        trace = self

        def traced_submit(fn, on_dead=None):
            trace.submits.append(clock())

            def run():
                start = clock()
                try:
                    fn()
                finally:
                    trace.pickups.append((start, clock()))

            submit(run, on_dead)

        def traced_step():
            start, start_cpu = clock(), cpu()
            try:
                return step()
            finally:
                trace.steps.append((start, clock(), cpu() - start_cpu))

        def traced_post(self, items, measure=False):
            # every hand-off measured, so that its start on the loop (``_start``) is stamped too
            entry = [clock(), None]  # listed first: the consumer may run before post returns
            trace.posts.append(entry)
            taken = post(self, items, True)  # whether the loop took them: the engine thread waits on those
            entry[1] = clock()
            return taken

        def traced_start(self):
            trace.dispatches.append([clock(), None, cpu()])
            start_handoff(self)

        def traced_end(self, measure):
            end_handoff(self, measure)
            if trace.dispatches and trace.dispatches[-1][1] is None:
                entry = trace.dispatches[-1]
                entry[1], entry[2] = clock(), cpu() - entry[2]

        engine_thread.submit, core.step = traced_submit, traced_step
        mailbox.post, mailbox._start, mailbox._end = traced_post, traced_start, traced_end
        try:
            yield self
        finally:
            engine_thread.submit, core.step = submit, step
            mailbox.post, mailbox._start, mailbox._end = post, start_handoff, end_handoff

    # ------------------------------------------------------------------ summaries

    def first_token(self, called: float, received: float) -> dict | None:
        """The phases of one streamed first token (the trace reset before the call)."""
        # by time, not position: an earlier call's command may record its end after the reset
        submit = next((t for t in self.submits if t >= called), None)
        if submit is None:
            return None
        pickup, added = next(((a, b) for a, b in self.pickups if a >= submit), (None, None))
        if pickup is None:
            return None
        post, posted = next(((a, b) for a, b in self.posts if a >= added), (None, None))
        dispatch = next((d[0] for d in self.dispatches if post is not None and d[0] >= post), None)
        steps = [s for s in self.steps if s[0] >= added and post is not None and s[1] <= post]
        if dispatch is None or not steps:
            return None
        return {
            "submit": submit - called,
            "pickup": pickup - submit,
            "add": added - pickup,
            "to_first_step": steps[0][0] - added,
            "steps": steps[-1][1] - steps[0][0],
            "num_steps": len(steps),
            "route": post - steps[-1][1],
            "post": None if posted is None else posted - post,  # None: the loop ran first
            "loop_wake": dispatch - post,
            "to_consumer": received - dispatch,
            "total": received - called,
        }

    def generate_call(self, called: float, returned: float) -> dict | None:
        """The phases of one ``generate`` timed on the engine thread from ``called`` to ``returned``."""
        steps = [s for s in self.steps if called <= s[0] and s[1] <= returned]
        if not steps:
            return None
        return {
            "prepare": steps[0][0] - called,
            "steps": steps[-1][1] - steps[0][0],
            "num_steps": len(steps),
            "finish": returned - steps[-1][1],
            "total": returned - called,
        }

    def step_summary(self, window: tuple[float, float]) -> dict:
        """The steps started in ``window``: all, those a dispatch overlapped, the others."""
        steps = [s for s in self.steps if window[0] <= s[0] < window[1]]
        spans = [(d[0], d[1] if d[1] is not None else d[0]) for d in self.dispatches]
        overlapped, clear = [], []
        for s in steps:
            (overlapped if any(a < s[1] and b > s[0] for a, b in spans) else clear).append(s)

        def summary(group):
            return {
                "count": len(group),
                "wall_ms": _median_ms([e - b for b, e, _ in group]),
                "cpu_ms": _median_ms([c for _, _, c in group]),
                "off_cpu_ms": _median_ms([e - b - c for b, e, c in group]),
            }

        return {"all": summary(steps), "with_dispatch": summary(overlapped), "without": summary(clear)}

    def handoff_summary(self, window: tuple[float, float]) -> dict:
        """Hand-offs in ``window`` (medians): the ``post`` call, the wait from the oldest post a dispatch
        takes until the loop starts it, the loop's wall time from the dispatch to the end of the
        consumers it woke, and its CPU time for them."""
        posts = [p for p in self.posts if window[0] <= p[0] < window[1]]
        dispatches = [d for d in self.dispatches if window[0] <= d[0] < window[1] and d[1] is not None]
        waits, i = [], 0
        for d in dispatches:  # from the oldest post the dispatch takes (posted since the last one)
            first = None
            while i < len(posts) and posts[i][0] <= d[0]:
                first = posts[i][0] if first is None else first
                i += 1
            if first is not None:
                waits.append(d[0] - first)
        return {
            "posts": len(posts),
            "dispatches": len(dispatches),
            "post_call_ms": _median_ms([b - a for a, b in posts if b is not None]),
            "post_to_dispatch_ms": _median_ms(waits),
            "dispatch_wall_ms": _median_ms([d[1] - d[0] for d in dispatches]),
            "dispatch_cpu_ms": _median_ms([d[2] for d in dispatches]),
        }


def median_phases(samples: list[dict]) -> dict:
    """Per phase, the median over samples, in ms (``num_steps`` as it is)."""
    samples = [s for s in samples if s is not None]
    if not samples:
        return {}
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples if s[key] is not None]
        out[key] = statistics.median(values) if key == "num_steps" and values else _median_ms(values)
    out["samples"] = len(samples)
    return out
