"""Debug dumps: the graph before and after each pass, each piece, and each piece's Inductor code."""

import os
import re

import torch


class GraphDumper:
    """Writes numbered files into ``path``; does nothing when ``path`` is None."""

    def __init__(self, path: str | None):
        self.path = path
        self.count = 0
        if path:
            os.makedirs(path, exist_ok=True)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def write(self, name: str, text: str, suffix: str = ".py") -> None:
        if not self.path:
            return
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        self.count += 1
        with open(os.path.join(self.path, f"{self.count:03d}_{safe}{suffix}"), "w") as f:
            f.write(text)

    def graph(self, name: str, graph) -> None:
        if not self.path:
            return
        if isinstance(graph, torch.fx.GraphModule):
            text = graph.print_readable(print_output=False, include_stride=True, include_device=True)
        else:
            text = str(graph)
        self.write(name, text)
