"""``FillThread``: one helper thread that runs a GIL-releasing call (a grammar fill) while the caller goes
on with its own Python work, then hands the result back.

A thread pool does not overlap the two: its worker must take the GIL to pick the job up, and again
when the call returns, while the caller runs Python and holds it; CPython hands the GIL over to a
waiting thread only after the switch interval (5 ms), so the worker starts (or returns) only once the
caller blocks, and the fill runs after the caller's work instead of beside it. Here the caller waits
(releasing the GIL) until the helper has entered the call, which releases the GIL at once, and the
helper's return waits for the caller's ``result()``, where the caller blocks anyway. What an overlapped
fill costs beyond ``max(fill, the caller's work)`` is those two hand-overs (a few tens of us).
"""

from __future__ import annotations

import threading


class FillThread:
    def __init__(self, name: str = "kiln-grammar-fill"):
        self._job = None
        self._result = None
        self._error: BaseException | None = None
        self._busy = False
        self._closed = False
        # three binary signals, each held until its event: blocking on a lock releases the GIL
        self._ready, self._started, self._done = threading.Lock(), threading.Lock(), threading.Lock()
        for lock in (self._ready, self._started, self._done):
            lock.acquire()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def start(self, fn, *args) -> None:
        """Run ``fn(*args)`` on the helper; returns once it has begun (``fn`` should release the GIL
        early, as a C++ call does)."""
        if self._busy:
            raise RuntimeError("FillThread.start: the previous job's result() was not taken")
        if self._closed:
            raise RuntimeError("FillThread.start: the thread was shut down")
        self._job, self._busy = (fn, args), True
        self._ready.release()
        self._started.acquire()

    def result(self):
        """Wait for the job started last; its return value (its exception is raised here)."""
        if not self._busy:
            raise RuntimeError("FillThread.result: no job was started")
        self._done.acquire()
        self._busy = False
        result, error, self._result, self._error = self._result, self._error, None, None
        if error is not None:
            raise error
        return result

    def _run(self) -> None:
        while True:
            self._ready.acquire()
            job, self._job = self._job, None
            if job is None:  # shut down
                self._started.release()
                return
            fn, args = job
            self._started.release()
            try:
                self._result = fn(*args)
            except BaseException as e:  # handed to result()
                self._error = e
            self._done.release()

    def shutdown(self) -> None:
        if self._closed:
            return
        if self._busy:
            try:
                self.result()
            except BaseException:  # the caller is shutting down: its last job's error is moot
                pass
        self._closed = True
        self._ready.release()
        self._started.acquire()
        self._thread.join()
