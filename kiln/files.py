"""File writes shared by kiln's caches (compile cache, GGUF config cache)."""

import os


def write_text_atomic(path: str, text: str) -> None:
    """``text`` into ``path`` through a temporary file beside it and a rename: a reader never sees half
    of it, and of two writers the last rename wins whole. Errors propagate (the temporary file removed)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
