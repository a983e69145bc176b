"""File locks on the compile cache, so processes starting at once on one cache directory agree.

``entry_lock`` is held by the process compiling into a key's directory: a second process with the same
key waits for it, then finds the entry complete and loads it instead of compiling the same code again.
``file_lock`` guards short read-modify-write updates (``measurements.json``). Both are ``flock`` locks on
a lock file beside the data: the kernel drops them when their holder exits, however it exits.
"""

import fcntl
import logging
import os
from contextlib import contextmanager

logger = logging.getLogger("kiln.compiler")


@contextmanager
def file_lock(path: str, what: str = ""):
    """Exclusive lock on ``path`` (created if absent) for the ``with`` block; logs once when it waits."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if what:
                logger.info("kiln compile cache: waiting for another process %s", what)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
