"""The persistent compile cache: one directory per key under ``cache_dir`` (default ``~/.cache/kiln``).

The key hashes the model config, dtype and device, kiln's version and sources, torch's (and
Triton's) version and every compilation setting that can change generated code. Inside a key's
directory Inductor keeps its own caches (the AOT-autograd and FX-graph caches, with the compiled
kernels), so a warm start skips AOT tracing, lowering and the C++/Triton builds; ``manifest.json``
records what the cold start compiled.
"""

import dataclasses
import hashlib
import json
import os
import sys
from contextlib import contextmanager, nullcontext

import torch

MANIFEST = "manifest.json"
MEASUREMENTS = "measurements.json"  # figures measured at start-up, reused by warm starts
_SOURCE_DIRS = ("models", "ops", "compiler", "lora")


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


def cache_key_details(
    model_config, dtype: torch.dtype, device: torch.device, compilation_config, lora=None, model=None
) -> dict:
    from kiln import __version__

    tensors = None if model is None else model_fingerprint(model)
    arch = getattr(model_config, "arch", model_config)  # a runtime ModelConfigView wraps it
    model = {k: v for k, v in dataclasses.asdict(arch).items() if k != "raw"}
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
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
    }


def cache_key(details: dict) -> str:
    return hashlib.sha256(json.dumps(details, sort_keys=True, default=str).encode()).hexdigest()[:20]


class CompileCache:
    """``root/key``; ``activate()`` points Inductor's and Triton's caches there while compiling."""

    def __init__(self, root: str, details: dict, enabled: bool = True):
        self.root, self.details, self.enabled = root, details, enabled
        self.key = cache_key(details)
        self.dir = os.path.join(root, self.key)

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
        tmp = os.path.join(self.dir, f".{MANIFEST}.{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump({"key": self.key, "details": self.details, **data}, f, indent=1, default=str)
        os.replace(tmp, os.path.join(self.dir, MANIFEST))

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
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, MEASUREMENTS)
        data = {}
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    data = json.load(f)
            except (OSError, ValueError):
                data = {}
        data[name] = value
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)

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
