"""``heap_frozen``: the objects alive when a run starts sit out the garbage collector while it runs.

A beam search allocates a few
objects per request and step; they trigger the collector's full collections now and then, and each
walks the whole heap: the model, torch's and kiln's modules, compiled code (hundreds of thousands of
objects, 0.1-0.2 s on a CPU), stalling the run meanwhile. ``gc.freeze`` moves every object alive
into a permanent generation that collections skip, in constant time; ``gc.unfreeze`` at the end of
the run gives them back, so nothing that becomes garbage later stays uncollected. Objects made
during the run are collected as before. A caller that froze the heap itself keeps it frozen.
"""

import contextlib
import gc


@contextlib.contextmanager
def heap_frozen():
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
