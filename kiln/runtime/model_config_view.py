"""``llm.model_config``: a read-only view with vLLM's commonly read model-config attributes.

It answers ``model``, ``served_model_name``, ``tokenizer``, ``max_model_len``, ``dtype``, ``runner_type``,
``max_logprobs``, ``logprobs_mode``, ``seed``, ``revision``, ``hf_config`` and ``get_vocab_size()``; any
other attribute comes from kiln's architecture config (``kiln.models.config.ModelConfig``).
"""

from collections.abc import Callable
from types import MappingProxyType, SimpleNamespace

from kiln.models.config import ModelConfig
from kiln.runtime.config import EngineConfig


class ModelConfigView:
    __slots__ = ("_arch", "_engine", "_names")

    def __init__(
        self,
        arch: ModelConfig,
        engine: Callable[[], EngineConfig],
        model: str,
        tokenizer: str | None,
        **names,
    ):
        object.__setattr__(self, "_arch", arch)
        object.__setattr__(self, "_engine", engine)
        object.__setattr__(
            self, "_names", MappingProxyType({"model": model, "tokenizer": tokenizer, **names})
        )

    @property
    def arch(self) -> ModelConfig:
        """kiln's architecture config."""
        return self._arch

    @property
    def model(self) -> str:
        return self._names["model"]

    @property
    def served_model_name(self) -> str:
        return self._names.get("served_model_name") or self.model

    @property
    def tokenizer(self) -> str:
        return self._names["tokenizer"] or self.model

    @property
    def revision(self) -> str | None:
        return self._names.get("revision")

    @property
    def max_model_len(self) -> int:
        return self._engine().max_model_len

    @property
    def dtype(self):
        return self._engine().dtype

    @property
    def seed(self) -> int:
        return self._engine().seed

    @property
    def max_logprobs(self) -> int:
        return self._engine().max_logprobs

    @property
    def logprobs_mode(self) -> str:
        return self._engine().logprobs_mode

    @property
    def runner_type(self) -> str:
        return "generate" if self._engine().pooling is None else "pooling"

    @property
    def architectures(self) -> list[str]:
        return [self._arch.architecture]

    @property
    def hf_config(self) -> SimpleNamespace:
        """The checkpoint's config.json (after ``hf_overrides``) as attributes."""
        return SimpleNamespace(**self._arch.raw)

    def get_vocab_size(self) -> int:
        return self._arch.vocab_size

    def __getattr__(self, name: str):
        return getattr(object.__getattribute__(self, "_arch"), name)

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"model_config is read-only (cannot set {name!r})")

    def __repr__(self) -> str:
        return (
            f"ModelConfig(model={self.model!r}, architecture={self._arch.architecture!r}, "
            f"max_model_len={self.max_model_len}, dtype={self.dtype}, runner_type={self.runner_type!r})"
        )
