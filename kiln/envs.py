"""Every environment variable kiln reads, in one place (README.md lists them).

Each knob is a function so that a change to ``os.environ`` (a test, a parent process setting up a child)
is seen at the moment kiln needs the value.
"""

import os


def attention_backend() -> str | None:
    """``KILN_ATTENTION_BACKEND``: default attention backend (``torch`` or ``triton``) when
    ``attention_config`` names none. Unset: ``triton`` on CUDA, ``torch`` elsewhere."""
    return os.environ.get("KILN_ATTENTION_BACKEND") or None


def cache_dir() -> str | None:
    """``KILN_CACHE_DIR``: root of the persistent compile cache when ``compilation_config.cache_dir`` is
    unset. Unset: ``~/.cache/kiln``."""
    return os.environ.get("KILN_CACHE_DIR") or None


def git_sha() -> str | None:
    """``KILN_GIT_SHA``: the commit benchmark results are recorded under, for copies of the source tree
    without ``.git``."""
    return os.environ.get("KILN_GIT_SHA") or None


def triton_interpret() -> bool:
    """``TRITON_INTERPRET`` (Triton's own switch, read here too): the kernels run in Triton's CPU
    interpreter, which lacks bf16 arithmetic, so kiln's kernels upcast bf16 there."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (huggingface_hub's own switch, read here too): a hub id not in the local cache is
    an error instead of a download."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cuda_alloc_conf() -> str:
    """``PYTORCH_CUDA_ALLOC_CONF`` (torch's own, read here too): the caching allocator's settings, which
    change the memory peaks a warm start reuses, so they key the recorded KV profile."""
    return os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")


def hub_endpoint() -> str | None:
    """``HF_ENDPOINT`` (huggingface_hub's own, read here too): where hub ids are downloaded from."""
    return os.environ.get("HF_ENDPOINT") or None


DEFAULT_LOG_STATS_INTERVAL = 10.0


def log_stats_interval() -> float:
    """``KILN_LOG_STATS_INTERVAL``: seconds between the stats lines of ``LLM(disable_log_stats=False)``.
    Unset: 10 (vLLM's interval). Not a number >= 0: ValueError naming the variable."""
    raw = os.environ.get("KILN_LOG_STATS_INTERVAL")
    if raw is None or raw == "":
        return DEFAULT_LOG_STATS_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"KILN_LOG_STATS_INTERVAL must be a number of seconds >= 0, got {raw!r}")
    return value


def distributed_timeout() -> float:
    """``KILN_DISTRIBUTED_TIMEOUT``: seconds rank 0 waits for another tensor-parallel rank (start-up,
    a call's reply, a collective), and the first data-parallel replica for another (start-up, a control
    call's reply), before it raises. Unset: 300."""
    return float(os.environ.get("KILN_DISTRIBUTED_TIMEOUT") or 300)


def grammar_threads() -> int | None:
    """``KILN_GRAMMAR_THREADS``: threads that may fill a step's grammar bitmasks (xgrammar), the
    engine's own included (how many a step uses: ``xgrammar_backend.fill_shares``). Unset: half the
    CPUs this process may run on, at most 8."""
    raw = os.environ.get("KILN_GRAMMAR_THREADS")
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"KILN_GRAMMAR_THREADS must be a whole number of threads >= 1, got {raw!r}")
    return int(raw)
