"""The persistent compile cache: one directory per key under ``cache_dir`` (default ``~/.cache/kiln``).

The key hashes the model config, dtype and device, kiln's version and sources, torch's (and
Triton's) version and every compilation setting that can change generated code. Inside a key's
directory Inductor keeps its own caches (the AOT-autograd and FX-graph caches, with the compiled
kernels), so a warm start skips AOT tracing, lowering and the C++/Triton builds; ``manifest.json``
records what the cold start compiled, with the key's details: a later start whose key differs names
the settings that changed (``cache_diff.py``). The process that compiles into an entry holds its lock
(``cache_lock.py``), so a second process with the same key waits and then loads what the first wrote.
"""

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import sys
from contextlib import contextmanager, nullcontext

import torch

from kiln.compiler.cache_diff import miss_reason
from kiln.compiler.cache_lock import file_lock
from kiln.files import write_text_atomic

MANIFEST = "manifest.json"
MEASUREMENTS = "measurements.json"  # figures measured at start-up, reused by warm starts
LOCK = ".lock"  # held while a process compiles into the entry
MEASUREMENTS_LOCK = ".measurements.lock"
_SOURCE_DIRS = ("models", "ops", "compiler", "lora", "distributed")  # distributed: the TP layers traced
# model config fields no compiled code reads (token ids for stopping, the checkpoint's stored dtype)
_NOT_CODE_MODEL_FIELDS = ("raw", "eos_token_id", "bos_token_id", "torch_dtype")


def source_hash() -> str:
    """Hash of kiln's model, op and compiler sources: the code Dynamo traces and the passes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for sub in _SOURCE_DIRS:
        for dirpath, dirnames, files in os.walk(os.path.join(root, sub)):
            dirnames.sort()
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    digest.update(os.path.relpath(path, root).encode())
                    with open(path, "rb") as f:
                        digest.update(f.read())
    return digest.hexdigest()[:16]


def _device_fingerprint(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"cuda:{props.name}:{props.major}.{props.minor}:cuda{torch.version.cuda}"
    return device.type


def model_fingerprint(model) -> str:
    """The names, dtypes and shapes of the model's tensors and its attention layers' fp8 KV scales: what
    quantization changes (fp8 projections, their scales) while the model config stays the same."""
    digest = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
    for name, module in model.named_modules():
        if hasattr(module, "k_scale"):
            digest.update(f"{name}:{module.k_scale}:{module.v_scale};".encode())
    return digest.hexdigest()[:16]


class CompileCacheMissError(RuntimeError):
    """``compilation_config.cache="require"`` and the compile cache has no complete entry for this start."""


def cache_key_details(
    model_config,
    dtype: torch.dtype,
    device: torch.device,
    compilation_config,
    lora=None,
    model=None,
    trace_tokens: int | None = None,
) -> dict:
    """Everything that can change the code compiled for this model. Left out on purpose, as they change
    no generated code: the KV-cache size and memory settings, seeds, batch limits (except through
    ``trace_tokens``, the size hint of the one trace), CUDA-graph sizes (graphs are captured anew at each
    start), the attention backend and KV-cache dtype (attention is an opaque op the graph calls), and
    where things are written."""
    from kiln import __version__

    tensors = None if model is None else model_fingerprint(model)
    model_class = None if model is None else f"{type(model).__module__}.{type(model).__qualname__}"
    arch = getattr(model_config, "arch", model_config)  # a runtime ModelConfigView wraps it
    model = {k: v for k, v in dataclasses.asdict(arch).items() if k not in _NOT_CODE_MODEL_FIELDS}
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    return {
        "model_config": model,
        "dtype": str(dtype),
        "device": _device_fingerprint(device),
        "kiln_version": __version__,
        "kiln_sources": source_hash(),
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "compilation_config": compilation_config.cache_fields(),
        "lora": None if lora is None else dataclasses.asdict(lora),  # the LoRA wrappers change the graph
        "model_tensors": tensors,
        "model_class": model_class,
        "trace_tokens": trace_tokens,
    }


def cache_key(details: dict) -> str:
    return hashlib.sha256(json.dumps(details, sort_keys=True, default=str).encode()).hexdigest()[:20]


class CompileCache:
    """``root/key``; ``activate()`` points Inductor's and Triton's caches there while compiling."""

    def __init__(self, root: str, details: dict, enabled: bool = True):
        self.root, self.details, self.enabled = root, details, enabled
        self.key = cache_key(details)
        self.dir = os.path.join(root, self.key)

    def lookup(self) -> tuple[bool, str]:
        """(complete entry present, one line saying so or why not)."""
        if not self.enabled:
            return False, "disabled (use_cache=False)"
        if self.manifest() is not None:
            return True, f"hit: entry {self.key}"
        return False, miss_reason(self.root, self.details)

    @contextmanager
    def entry_lock(self):
        """Held while this process compiles into the entry (no-op when the cache is off)."""
        if not self.enabled:
            yield
            return
        with file_lock(os.path.join(self.dir, LOCK), f"to finish compiling into {self.dir}"):
            yield

    def manifest(self) -> dict | None:
        path = os.path.join(self.dir, MANIFEST)
        if not self.enabled or not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def save_manifest(self, data: dict) -> None:
        if not self.enabled:
            return
        os.makedirs(self.dir, exist_ok=True)
        manifest = {"key": self.key, "details": self.details, **data}
        write_text_atomic(os.path.join(self.dir, MANIFEST), json.dumps(manifest, indent=1, default=str))

    def measurement(self, name: str):
        """A value recorded by an earlier start with this key (e.g. CUDA-graph memory), or None."""
        path = os.path.join(self.dir, MEASUREMENTS)
        if not self.enabled or not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                return json.load(f).get(name)
        except (OSError, ValueError):
            return None

    def record_measurement(self, name: str, value) -> None:
        if not self.enabled:
            return
        path = os.path.join(self.dir, MEASUREMENTS)
        with file_lock(os.path.join(self.dir, MEASUREMENTS_LOCK)):  # read-modify-write: one process at a time
            data = {}
            if os.path.isfile(path):
                try:
                    with open(path) as f:
                        data = json.load(f)
                except (OSError, ValueError):
                    data = {}
            data[name] = value
            write_text_atomic(path, json.dumps(data, indent=1))

    @contextmanager
    def activate(self):
        if not self.enabled:
            from torch._functorch import config as functorch_config
            from torch._inductor import config as inductor_config

            with (
                inductor_config.patch(fx_graph_cache=False),
                functorch_config.patch(enable_autograd_cache=False),
            ):
                yield
            return
        os.makedirs(self.dir, exist_ok=True)
        saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(self.dir, "inductor")
        os.environ["TRITON_CACHE_DIR"] = os.path.join(self.dir, "triton")
        try:
            with _caches_on():
                yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _caches_on():
    try:
        from torch._functorch import config as functorch_config
        from torch._inductor import config as inductor_config
    except ImportError:
        return nullcontext()
    from contextlib import ExitStack

    stack = ExitStack()
    stack.enter_context(inductor_config.patch(fx_graph_cache=True))
    stack.enter_context(functorch_config.patch(enable_autograd_cache=True))
    return stack
