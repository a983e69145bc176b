"""``CompilationConfig``: how ``LLM`` compiles the model forward, validated strictly.

``LLM(compilation_config=...)`` takes an int or a mode name (the mode alone), a dict or a
``CompilationConfig``. Unknown keys and bad values raise ``InvalidCompilationConfig`` (a
``ValueError``) naming the key; nothing is dropped silently.

Modes:

- ``none`` (0): plain eager forward, no Dynamo, no Inductor (what ``enforce_eager=True`` forces).
- ``dynamo`` (1): Dynamo traces the forward once; the captured FX graph runs op by op.
- ``inductor`` (2): Dynamo + Inductor over the whole graph, attention included (stock torch.compile).
- ``piecewise`` (3): kiln's backend: FX passes, split at every splitting op, Inductor per piece,
  identical pieces compiled once.

Default (``mode=None``): ``piecewise`` on CUDA. On CPU the default is ``none``: Inductor's C++
build costs tens of seconds to minutes per model on small machines, which every ``LLM()`` would
pay; pass ``compilation_config=3`` (or ``{"mode": "piecewise"}``) to compile on CPU.
"""

import os
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from kiln import envs

DEFAULT_SPLITTING_OPS = ("kiln::attention",)
CUDAGRAPH_MODES = ("none", "piecewise", "full", "full_and_piecewise")
# fields that change no compiled code: not part of the compile-cache key
NOT_CODE_FIELDS = frozenset(
    {"cache_dir", "use_cache", "cache", "debug_dump_path", "cudagraph_mode", "cudagraph_capture_sizes"}
)


class CompilationMode(IntEnum):
    NONE = 0
    DYNAMO = 1
    INDUCTOR = 2
    PIECEWISE = 3

    @property
    def label(self) -> str:
        return self.name.lower()


class InvalidCompilationConfig(ValueError):
    """A ``compilation_config`` that fails validation; the message names each offending key."""


class PassConfig(BaseModel):
    """Toggles for kiln's graph passes (defaults: what measured as a win, see benchmarks/results)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    eliminate_noops: bool = True
    fuse_add_rms_norm: bool = False
    fuse_silu_mul: bool = False
    # one-token products with RMSNorm / SiLU-mul / residual add folded in (static compiles of size 1);
    # static compiles then skip coordinate-descent tuning (see static_inductor_options)
    fuse_gemv: bool = False
    # fp8 models: products of at most kiln.ops.fp8_gemv.MAX_ROWS rows (static compiles) as the weight-only
    # kiln::fp8_gemv, activations not quantized
    fuse_fp8_gemv: bool = False
    # fp8 models: the per-token activation quantization folded into the op before it
    fuse_add_rms_norm_quant: bool = False
    fuse_rms_norm_quant: bool = False
    fuse_silu_mul_quant: bool = False

    def enabled_fusions(self) -> list[str]:
        # fp8 gemv first (it drops the quantization the quant fusions fold, and its reference products
        # on CPU look like bf16 ones); gemv next: it takes the residual adds; the quant fusions before
        # the plain ones they contain
        order = ("fuse_fp8_gemv", "fuse_gemv")
        order += ("fuse_add_rms_norm_quant", "fuse_rms_norm_quant", "fuse_silu_mul_quant")
        order += ("fuse_add_rms_norm", "fuse_silu_mul")
        return [name for name in order if getattr(self, name)]


class CompilationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    mode: CompilationMode | None = None
    backend: Literal["inductor", "eager"] = "inductor"
    splitting_ops: list[str] = list(DEFAULT_SPLITTING_OPS)
    compile_sizes: list[int] = []
    tune_static_compiles: bool = True  # coordinate-descent tuning for the compile_sizes compiles
    pass_config: PassConfig = PassConfig()
    inductor_compile_config: dict[str, Any] = {}
    cache_dir: str | None = None
    use_cache: bool = True
    # "auto": a miss compiles and fills the cache; "require": a miss is a CompileCacheMissError (fleets
    # that ship a cache filled by `kiln compile`)
    cache: Literal["auto", "require"] = "auto"
    # keep Dynamo's traced graph in the cache entry: warm starts load it instead of tracing
    # (kiln/compiler/dynamo_graph.py; traced as before where torch lacks the AOT entry points)
    reuse_dynamo_graph: bool = False
    debug_dump_path: str | None = None
    cudagraph_mode: Literal["none", "piecewise", "full", "full_and_piecewise"] = "full_and_piecewise"
    cudagraph_capture_sizes: list[int] | None = None

    @field_validator("mode", mode="before")
    @classmethod
    def _parse_mode(cls, value):
        if value is None or isinstance(value, CompilationMode):
            return value
        expected = f"mode must be 0-3 or one of {[m.label for m in CompilationMode]}, got {value!r}"
        if isinstance(value, bool):
            raise ValueError(expected)
        if isinstance(value, str):
            names = {m.label: m for m in CompilationMode}
            key = value.strip().lower()
            if key.isdigit():
                value = int(key)
            elif key in names:
                return names[key]
            else:
                raise ValueError(f"unknown mode {value!r}; use one of {list(names)} or 0-3")
        if isinstance(value, int) and value in CompilationMode._value2member_map_:
            return CompilationMode(value)
        raise ValueError(expected)

    @field_validator("splitting_ops")
    @classmethod
    def _check_ops(cls, ops: list[str]) -> list[str]:
        for op in ops:
            ns, sep, name = op.partition("::")
            if not sep or not ns or not name or not name.replace(".", "").replace("_", "").isalnum():
                raise ValueError(f"splitting op {op!r} is not an operator name like 'kiln::attention'")
        return list(dict.fromkeys(ops))

    @field_validator("compile_sizes", "cudagraph_capture_sizes")
    @classmethod
    def _check_sizes(cls, sizes: list[int] | None) -> list[int] | None:
        if sizes is None:
            return None
        bad = [s for s in sizes if s < 1]
        if bad:
            raise ValueError(f"sizes must be positive token counts, got {bad}")
        return sorted(set(sizes))

    @field_validator("inductor_compile_config")
    @classmethod
    def _check_inductor_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        import json

        from torch._inductor import config as inductor_config

        known = set(inductor_config.get_config_copy())
        unknown = sorted(k for k in options if k not in known)
        if unknown:
            raise ValueError(f"unknown Inductor option(s) {unknown} (see torch._inductor.list_options())")
        try:
            json.dumps(options, sort_keys=True)
        except TypeError as e:
            raise ValueError(f"Inductor options must be JSON values (they key the compile cache): {e}") from e
        return options

    @model_validator(mode="after")
    def _check_cache(self) -> "CompilationConfig":
        if self.cache == "require" and not self.use_cache:
            raise ValueError("cache='require' needs use_cache=True (got use_cache=False)")
        if self.reuse_dynamo_graph and not self.use_cache:
            raise ValueError("reuse_dynamo_graph=True needs use_cache=True (got use_cache=False)")
        return self

    # ------------------------------------------------------------------ helpers

    @classmethod
    def parse(cls, value: Any) -> "CompilationConfig":
        """Build from what ``LLM(compilation_config=...)`` accepts: None, int, mode name, dict or object."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value.model_copy(deep=True)
        try:
            if isinstance(value, (int, str)) and not isinstance(value, bool):
                return cls(mode=value)
            if isinstance(value, dict):
                return cls.model_validate(value)
        except ValidationError as e:
            raise InvalidCompilationConfig(_describe(e)) from None
        raise InvalidCompilationConfig(
            f"compilation_config must be an int (mode), a mode name, a dict or a CompilationConfig, "
            f"got {type(value).__name__}"
        )

    def resolve(
        self,
        device_type: str,
        enforce_eager: bool,
        graphs_supported: bool,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        attention_backend: str = "",
    ) -> "CompilationPlan":
        """The rules that follow from this config and the engine: compilation mode, static compiles,
        CUDA-graph sizes (full graphs for decode batches up to ``max_num_seqs`` sequences, piecewise
        graphs for token counts up to ``max_num_batched_tokens``) and the one-row logits product."""
        mode = CompilationMode.NONE if enforce_eager else self.resolved_mode(device_type)
        if enforce_eager:
            reason = "enforce_eager=True"
        elif device_type != "cuda":
            reason = f"device {device_type} has no CUDA graphs"
        elif not graphs_supported:
            reason = f"the {attention_backend or 'chosen'} attention backend does not support CUDA graphs"
        elif self.cudagraph_mode == "none":
            reason = 'cudagraph_mode="none"'
        else:
            reason = ""
        full: tuple[int, ...] = ()
        piecewise: tuple[int, ...] = ()
        if not reason:
            from kiln.compiler.cudagraph import default_capture_sizes

            sizes = sorted(self.cudagraph_capture_sizes or default_capture_sizes(max_num_seqs))
            if self.cudagraph_mode in ("full", "full_and_piecewise"):
                full = tuple(s for s in sizes if s <= max_num_seqs)
            if (
                self.cudagraph_mode in ("piecewise", "full_and_piecewise")
                and mode == CompilationMode.PIECEWISE
            ):
                piecewise = tuple(s for s in sizes if s <= max_num_batched_tokens)
            if not full and not piecewise:
                reason = (
                    f"no capture size fits (cudagraph_mode={self.cudagraph_mode!r}, "
                    f"compilation mode {mode.label})"
                )
        return CompilationPlan(
            mode=mode,
            compile_sizes=tuple(self.compile_sizes) if mode == CompilationMode.PIECEWISE else (),
            full_graph_sizes=full,
            piecewise_graph_sizes=piecewise,
            graphs_off_reason=reason,
            one_row_logits=device_type == "cuda" and not enforce_eager and self.pass_config.fuse_gemv,
        )

    def resolved_mode(self, device_type: str) -> CompilationMode:
        if self.mode is not None:
            return self.mode
        return CompilationMode.PIECEWISE if device_type == "cuda" else CompilationMode.NONE

    def static_inductor_options(self) -> dict[str, Any]:
        """Inductor options of a static-size compile: the general ones, plus coordinate-descent
        tuning when ``tune_static_compiles`` is on and the general options leave it unset.

        With a static batch of one and this tuning, Inductor turns each matmul into a Triton
        reduction fused with its neighbours (RMSNorm before it, SiLU-mul before the down projection),
        which beats cuBLAS's GEMV plus separate kernels: ``compile_sizes=[1]`` is the batch-1 latency
        setting. It is off by default because the tuning lengthens start-up, cold and warm
        (benchmarks/README.md has both sides of the trade).

        With ``pass_config.fuse_gemv`` the products become ``kiln::gemv`` with fixed block sizes instead,
        and the tuning is left off: with it Inductor decomposes a one-row matmul before kiln's passes
        see it, so they could not match."""
        options = dict(self.inductor_compile_config)
        if self.tune_static_compiles and not self.pass_config.fuse_gemv:
            options.setdefault("coordinate_descent_tuning", True)
        return options

    def resolved_cache_dir(self) -> str:
        path = self.cache_dir or envs.cache_dir() or os.path.join("~", ".cache", "kiln")
        return os.path.abspath(os.path.expanduser(path))

    def cache_root(self) -> str | None:
        """The cache directory when the cache is used (``use_cache``), else None: where GGUF configs and
        tokenizers are kept besides the compiled code."""
        return self.resolved_cache_dir() if self.use_cache else None

    def cache_fields(self) -> dict[str, Any]:
        """Every field that can change compiled code. Left out: where things are written, how the cache
        is used, and the CUDA-graph settings (graphs are captured at every start from the same code)."""
        return self.model_dump(mode="json", exclude=NOT_CODE_FIELDS)


@dataclass(frozen=True)
class CompilationPlan:
    """What start-up does, derived once by ``CompilationConfig.resolve``."""

    mode: CompilationMode
    compile_sizes: tuple[int, ...]  # static-shape compiles (piecewise mode only)
    full_graph_sizes: tuple[int, ...]  # decode batch sizes captured as full graphs
    piecewise_graph_sizes: tuple[int, ...]  # token counts captured as piecewise graphs
    graphs_off_reason: str  # why no CUDA graph is captured ("" when some are)
    one_row_logits: bool  # a one-row batch's logits through kiln::gemv (fuse_gemv on CUDA)

    @property
    def compiled(self) -> bool:
        return self.mode != CompilationMode.NONE

    def describe_graphs(self) -> str:
        if self.graphs_off_reason:
            return f"off ({self.graphs_off_reason})"
        parts = []
        if self.full_graph_sizes:
            parts.append(f"full {_span(self.full_graph_sizes)}")
        if self.piecewise_graph_sizes:
            parts.append(f"piecewise {_span(self.piecewise_graph_sizes)}")
        return " + ".join(parts)


def _span(sizes: tuple[int, ...]) -> str:
    return f"x{len(sizes)} ({sizes[0]}..{sizes[-1]})"


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "compilation_config"
        if item["type"] == "extra_forbidden":
            parent = item["loc"][:-1]
            model = PassConfig if parent == ("pass_config",) else CompilationConfig
            lines.append(f"unknown key {key!r} (valid keys: {', '.join(model.model_fields)})")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            got = "" if "got" in msg else f" (got {item.get('input')!r})"
            lines.append(f"{key}: {msg}{got}")
    return "compilation_config: " + "; ".join(lines)
