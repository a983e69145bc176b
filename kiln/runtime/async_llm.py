"""``AsyncLLM`` (``AsyncLLMEngine``): vLLM's asyncio serving API on kiln's engine.

The ``LLM`` lives on one background thread (``kiln/runtime/engine_thread.py``) that runs every call
into it and steps it, so ``await`` never waits on the device and every coroutine's request joins one
continuous batch. ``generate`` is an async generator of ``RequestOutput``s following the request's
``output_kind`` (``kiln/runtime/request_stream.py``). A consumer that stops iterating (``break``,
cancellation) aborts its request and frees its KV blocks; errors in a request (bad parameters, an
over-long prompt) reach only the coroutine awaiting it.
"""

import asyncio
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import Any

from kiln.runtime.engine_thread import EngineDeadError, EngineThread
from kiln.runtime.llm import LLM
from kiln.runtime.outputs import RequestOutput
from kiln.runtime.request_stream import LoopMailbox, RequestStream
from kiln.runtime.sampling_params import SamplingParams

__all__ = ["AsyncEngineArgs", "AsyncLLM", "AsyncLLMEngine", "EngineDeadError"]


class AsyncEngineArgs:
    """The engine arguments of ``AsyncLLM``: ``model`` and any keyword ``LLM(...)`` accepts (checked
    when the engine is built)."""

    def __init__(self, model: str, **kwargs: Any):
        self.model, self.kwargs = model, kwargs

    def __repr__(self) -> str:
        return f"AsyncEngineArgs(model={self.model!r}, {self.kwargs!r})"


class AsyncLLM:
    def __init__(self, model: str, **kwargs: Any):
        """Build an ``LLM(model, **kwargs)`` on the engine thread and start its loop."""
        self._active: dict[str, RequestStream] = {}  # request id -> its stream, while a consumer holds it
        self._mailboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> its mailbox
        self._lock = threading.Lock()
        self._engine = EngineThread(lambda: LLM(model, **kwargs))
        self.tokenizer = self._engine.llm.tokenizer

    @classmethod
    def from_engine_args(cls, engine_args: AsyncEngineArgs, start_engine_loop: bool = True, **_: Any):
        if not isinstance(engine_args, AsyncEngineArgs):
            raise ValueError(f"engine_args must be an AsyncEngineArgs, got {type(engine_args).__name__}")
        if not start_engine_loop:
            raise NotImplementedError("start_engine_loop=False: kiln's engine loop always starts")
        return cls(engine_args.model, **engine_args.kwargs)

    # ------------------------------------------------------------------ generation

    async def generate(
        self,
        prompt: Any,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        lora_request: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        trace_headers: Any = None,
        priority: int = 0,
        data_parallel_rank: int | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream one request's outputs as tokens arrive (``sampling_params.output_kind`` says what
        each holds); the last has ``finished=True``."""
        if lora_request is not None or data_parallel_rank is not None:
            raise NotImplementedError("kiln does not implement lora_request or data_parallel_rank")
        if not isinstance(request_id, str):
            raise ValueError(f"request_id must be a str, got {request_id!r}")
        if sampling_params is not None and not isinstance(sampling_params, SamplingParams):
            raise ValueError(
                f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}"
            )
        self._check_alive()
        loop = asyncio.get_running_loop()
        with self._lock:
            if request_id in self._active:
                raise ValueError(f"request_id {request_id!r} is already in use")
            mailbox = self._mailboxes.get(loop)
            if mailbox is None:
                mailbox = self._mailboxes[loop] = LoopMailbox(loop)
            stream = self._active[request_id] = RequestStream(request_id, mailbox)
        add_special = (tokenization_kwargs or {}).get("add_special_tokens", True)
        engine = self._engine
        finished = False
        try:
            engine.submit(
                lambda: self._add(stream, prompt, sampling_params, add_special, priority),
                lambda error: mailbox.post([(stream, error)]),
            )
            items = stream.items
            while True:
                item = items.popleft() if items else await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                if self._active.get(request_id) is stream:
                    del self._active[request_id]
            if not finished:  # the consumer stopped early: drop the request
                engine.submit(lambda: engine.abort(request_id, stream, notify=False))

    def _add(self, stream: RequestStream, prompt, params, add_special_tokens: bool, priority: int) -> None:
        """On the engine thread: validate, tokenize and add one request (an error goes to its stream)."""
        engine = self._engine
        if engine.paused:
            engine.held.append((stream, prompt, (params, add_special_tokens, priority)))
            return
        llm = engine.llm
        try:
            if isinstance(prompt, list) and not all(isinstance(t, int) for t in prompt):
                raise ValueError("prompt: AsyncLLM.generate takes one prompt")
            tokenization = {"add_special_tokens": add_special_tokens}
            [(processed, params, prio, lora)] = llm._prepare(prompt, params, tokenization, [priority])
            text, ids = processed.text, processed.token_ids
            if stream.request_id in engine.streams:
                raise ValueError(f"request_id {stream.request_id!r} is already in use")
            llm.llm_engine.add_request(stream.request_id, text, ids, params, processed.cache_salt, prio, lora)
        except Exception as e:  # this request's error, for its coroutine only
            stream.mailbox.post([(stream, e)])
            return
        stream.start(text, ids, params.output_kind, llm.llm_engine.config.stream_interval)
        engine.streams[stream.request_id] = stream

    async def abort(self, request_id: str | Iterable[str]) -> None:
        """Abort requests: each stream ends with an output whose unfinished samples have finish
        reason ``"abort"``; their KV blocks are free when this returns. Unknown ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)

        def run(llm):
            for rid in ids:
                self._engine.abort(rid, None, notify=True)

        await self._call(run)

    async def _call(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(llm)`` on the engine thread; its result (or error) here."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def settle(ok: bool, value) -> None:
            if not future.done():
                (future.set_result if ok else future.set_exception)(value)

        def run() -> None:
            try:
                result = (True, fn(self._engine.llm))
            except Exception as e:
                result = (False, e)
            loop.call_soon_threadsafe(settle, *result)

        self._engine.submit(run, lambda error: loop.call_soon_threadsafe(settle, False, error))
        return await future

    # ------------------------------------------------------------------ lifecycle

    async def pause_generation(
        self, *, wait_for_inflight_requests: bool = False, clear_cache: bool = True
    ) -> None:
        """Stop admitting requests (new ones wait until ``resume_generation``). In-flight requests
        are aborted, or with ``wait_for_inflight_requests`` run to completion before this returns;
        ``clear_cache`` then resets the prefix cache."""
        loop = asyncio.get_running_loop()
        drained = loop.create_future()
        engine = self._engine

        def done() -> None:
            if clear_cache:
                engine.llm.reset_prefix_cache()
            loop.call_soon_threadsafe(lambda: drained.done() or drained.set_result(None))

        def run(llm) -> None:
            engine.paused = True
            if not wait_for_inflight_requests:
                engine.abort_all()
            engine._drain_waiters.append(done)

        await self._call(run)
        await drained

    async def resume_generation(self) -> None:
        """Admit requests again, the held ones first (in arrival order)."""
        engine = self._engine

        def run(llm) -> None:
            engine.paused = False
            held, engine.held = engine.held, []
            for stream, prompt, (params, add_special, priority) in held:
                self._add(stream, prompt, params, add_special, priority)

        await self._call(run)

    async def is_paused(self) -> bool:
        return await self._call(lambda llm: self._engine.paused)

    async def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """Forget the prefix cache (False while requests hold blocks)."""
        if reset_running_requests:
            raise NotImplementedError("reset_prefix_cache(reset_running_requests=True)")
        return await self._call(lambda llm: llm.reset_prefix_cache())

    async def sleep(self, level: int = 1) -> None:
        """Abort every request, then ``LLM.sleep(level)``."""

        def run(llm) -> None:
            self._engine.abort_all()
            llm.sleep(level)

        await self._call(run)

    async def wake_up(self, tags: list[str] | None = None) -> None:
        await self._call(lambda llm: llm.wake_up(tags))

    async def is_sleeping(self) -> bool:
        return await self._call(lambda llm: bool(llm.llm_engine.worker.asleep))

    async def get_tokenizer(self):
        return self.tokenizer

    async def check_health(self) -> None:
        self._check_alive()

    @property
    def is_running(self) -> bool:
        return self._engine.is_alive

    @property
    def is_stopped(self) -> bool:
        return not self._engine.is_alive

    @property
    def errored(self) -> bool:
        return self._engine.failed

    @property
    def dead_error(self) -> BaseException | None:
        return self._engine.dead_error

    def _check_alive(self) -> None:
        if self._engine.dead_error is not None:
            raise self._engine.dead_error

    def shutdown(self) -> None:
        """Abort every request (their streams raise ``EngineDeadError``), shut the ``LLM`` down and
        end the engine thread."""
        self._engine.stop()

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None and engine.is_alive:
            engine.stop()


AsyncLLMEngine = AsyncLLM
