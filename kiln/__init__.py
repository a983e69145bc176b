"""kiln: vLLM's offline API on an engine built around the PyTorch compiler."""

from kiln.compiler.config import CompilationConfig
from kiln.runtime.engine_args import EngineArgs
from kiln.runtime.inputs import TextPrompt, TokensPrompt
from kiln.runtime.llm import LLM
from kiln.runtime.outputs import CompletionOutput, Logprob, RequestOutput
from kiln.runtime.profiler import ProfilerConfig
from kiln.runtime.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "EngineArgs",
    "CompilationConfig",
    "ProfilerConfig",
    "SamplingParams",
    "RequestOutputKind",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "TextPrompt",
    "TokensPrompt",
]
