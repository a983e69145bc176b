"""A GGUF file's tokenizer, converted once and kept in kiln's cache.

transformers builds a GGUF file's fast tokenizer from the file's vocabulary and merges in Python: 7.5 s for
SmolLM2's 49,152 tokens on a 2-core CPU, at every start. The converted tokenizer is saved in the file's
cache entry (``kiln.models.gguf.cache_entry``, under the compile cache's root) and later starts load it as
a saved tokenizer (0.4 s); a damaged or unwritable entry falls back to converting.
"""

import logging
import os
import shutil

from kiln.models.gguf import cache_entry

logger = logging.getLogger("kiln")

_MARKER = "tokenizer_config.json"


def entry_dir(root: str, path: str) -> str:
    return os.path.join(cache_entry(root, path), "tokenizer")


def load_gguf_tokenizer(path: str, root: str | None, **kwargs):
    """``AutoTokenizer.from_pretrained(dir, gguf_file=name, **kwargs)``, from the cache under ``root``
    when an earlier start converted it (``root`` None: no cache)."""
    from transformers import AutoTokenizer

    folder, name = os.path.dirname(path) or ".", os.path.basename(path)
    entry = entry_dir(root, path) if root is not None and kwargs.get("use_fast", True) else None
    if entry is not None and os.path.isfile(os.path.join(entry, _MARKER)):
        try:
            tokenizer = AutoTokenizer.from_pretrained(entry, **kwargs)
        except Exception as e:  # a damaged entry (whatever transformers raises for it): convert again
            logger.warning("kiln: cached tokenizer %s unreadable (%s); converting %s again", entry, e, path)
            shutil.rmtree(entry, ignore_errors=True)  # the conversion's copy takes its place
        else:
            tokenizer.name_or_path = folder
            return tokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, **kwargs)
    if entry is not None:
        _save(tokenizer, entry)
    return tokenizer


def _save(tokenizer, entry: str) -> None:
    """Written beside the entry, then renamed into place: a reader never sees half an entry, and of two
    processes converting at once the second keeps the first one's."""
    tmp = f"{entry}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(entry), exist_ok=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, entry)
    except OSError as e:  # read-only cache, or another process renamed its copy first
        logger.debug("kiln: tokenizer cache entry %s not written: %s", entry, e)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
