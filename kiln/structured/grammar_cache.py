"""Compiled grammars, keyed by (backend, ``GrammarSpec``), compiled on a small thread pool.

The cache belongs to one engine, hence to one tokenizer: the key need not name it. A request whose
grammar is still compiling holds a pending ``Future``; the scheduler skips it until the future is done,
so a large schema never stalls the step loop. The least recently used entries beyond ``capacity`` are
dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class GrammarCache:
    def __init__(self, capacity: int = 512, workers: int = 2):
        self.capacity = capacity
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kiln-grammar")
        self.entries: OrderedDict[object, Future] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key) -> Future | None:
        future = self.entries.get(key)
        if future is not None:
            self.entries.move_to_end(key)
            self.hits += 1
        return future

    def submit(self, key, compile_fn: Callable, *args) -> Future:
        self.misses += 1
        future = self.pool.submit(compile_fn, *args)
        self.entries[key] = future
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)  # requests holding the future keep it alive
        return future

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
