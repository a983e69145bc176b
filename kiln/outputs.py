"""``kiln.outputs``: the import path of ``vllm.outputs``."""

from kiln.runtime.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput

__all__ = ["CompletionOutput", "Logprob", "RequestMetrics", "RequestOutput"]
