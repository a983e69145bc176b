"""Runs the enabled fusion passes inside Inductor (post-grad, on each piece's ATen graph).

Each fusion lives in its own module and exposes ``build() -> PatternMatcherPass``. The runner is an
Inductor ``CustomGraphPass`` whose ``uuid`` names the enabled passes and hashes their sources, so
Inductor's FX-graph cache keys on them.
"""

import importlib
import logging
import time

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

logger = logging.getLogger("kiln.compiler")

# config toggle -> module under kiln.compiler.passes
FUSIONS = {
    "fuse_gemv": "fusion_gemv",
    "fuse_fp8_gemv": "fusion_fp8_gemv",
    "fuse_add_rms_norm_quant": "fusion_add_rms_norm_quant",
    "fuse_rms_norm_quant": "fusion_rms_norm_quant",
    "fuse_silu_mul_quant": "fusion_silu_mul_quant",
    "fuse_add_rms_norm": "fusion_add_rms_norm",
    "fuse_silu_mul": "fusion_silu_mul",
}


class _PostGradFusions(CustomGraphPass):
    def __init__(self, owner: "FusionPasses"):
        self.owner = owner

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.owner.run(graph)

    def uuid(self):
        return self.owner.uuid


class FusionPasses:
    def __init__(self, enabled: list[str], counts: dict[str, int], dumper=None):
        self.enabled = list(enabled)
        self.dumper = dumper
        self.counts = counts
        self.seconds = 0.0
        self._passes = None
        self._custom = _PostGradFusions(self) if self.enabled else None
        files = [__file__] + [
            importlib.import_module(f"kiln.compiler.passes.{FUSIONS[n]}").__file__ for n in self.enabled
        ]
        self.uuid = (tuple(self.enabled), get_hash_for_files(tuple(files)))
        for name in self.enabled:
            counts.setdefault(name, 0)

    def inductor_pass(self):
        return self._custom

    def _build(self):
        if self._passes is None:
            self._passes = [
                (n, importlib.import_module(f"kiln.compiler.passes.{FUSIONS[n]}").build())
                for n in self.enabled
            ]
        return self._passes

    def run(self, graph: torch.fx.Graph) -> None:
        start = time.perf_counter()
        dump = self.dumper is not None and self.dumper.enabled
        for name, matcher in self._build():
            if dump:
                self.dumper.graph(f"post_grad_before_{name}", graph.python_code("self").src)
            replaced = matcher.apply(graph)
            self.counts[name] = self.counts.get(name, 0) + replaced
            logger.debug("fusion %s: %d replacements", name, replaced)
        graph.eliminate_dead_code()
        if dump:
            self.dumper.graph("post_grad_after_fusions", graph.python_code("self").src)
        self.seconds += time.perf_counter() - start
