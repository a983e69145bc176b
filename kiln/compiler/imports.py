"""The compiler stack's imports, made in one place at the start of a compiled start-up.

``torch._dynamo`` and ``torch._inductor.compile_fx`` pull in sympy, the symbolic-shapes machinery and
most of torch's compiler (over a thousand modules, seconds where Python has no bytecode cache for
torch). The Worker imports them first thing in its compile step, so the start-up timeline shows them as
their own phase (``compiler_import``) instead of spread over Dynamo, the cache load and the warm-ups; an
eager start-up never imports them.
"""

import importlib

MODULES = ("torch._dynamo", "torch._inductor.compile_fx")


def import_compiler() -> None:
    for name in MODULES:
        importlib.import_module(name)
