"""kiln: vLLM's offline API on an engine built around the PyTorch compiler."""

from kiln.compiler.config import CompilationConfig
from kiln.lora.request import LoRARequest
from kiln.pooling import (
    ClassificationOutput,
    ClassificationRequestOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    PoolerConfig,
    PoolingOutput,
    PoolingParams,
    PoolingRequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from kiln.runtime.async_llm import AsyncEngineArgs, AsyncLLM, AsyncLLMEngine
from kiln.runtime.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from kiln.runtime.engine_args import EngineArgs
from kiln.runtime.inputs import TextPrompt, TokensPrompt
from kiln.runtime.llm import LLM
from kiln.runtime.outputs import CompletionOutput, Logprob, RequestOutput
from kiln.runtime.profiler import ProfilerConfig
from kiln.runtime.sampling_params import RequestOutputKind, SamplingParams
from kiln.runtime.startup_timeline import mark_imported
from kiln.structured.params import StructuredOutputsConfig, StructuredOutputsParams

__version__ = "0.1.0"
mark_imported()  # the start-up timeline's "import" ends here
__all__ = [
    "LLM",
    "EngineArgs",
    "AsyncLLM",
    "AsyncLLMEngine",
    "AsyncEngineArgs",
    "BeamSearchParams",
    "BeamSearchOutput",
    "BeamSearchSequence",
    "CompilationConfig",
    "LoRARequest",
    "ProfilerConfig",
    "SamplingParams",
    "StructuredOutputsParams",
    "StructuredOutputsConfig",
    "RequestOutputKind",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "TextPrompt",
    "TokensPrompt",
    "PoolerConfig",
    "PoolingParams",
    "PoolingOutput",
    "PoolingRequestOutput",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "ClassificationOutput",
    "ClassificationRequestOutput",
    "ScoringOutput",
    "ScoringRequestOutput",
]
