"""Import the compiler stack (Dynamo, Inductor) on a helper thread while the weights load.

A compiled start-up needs ``torch._dynamo`` and ``torch._inductor.compile_fx`` (with sympy and the
symbolic-shapes machinery, seconds of imports) right after the weights are on the device; the weight
load itself mostly waits on file reads and copies that release the GIL. The Worker starts this before
building the model and waits for it before compiling; if the import fails here, the compile's own
import raises the error.
"""

import threading

MODULES = ("torch._dynamo", "torch._inductor.compile_fx")


class CompilerImport:
    def __init__(self):
        self._thread = threading.Thread(target=self._run, name="kiln-compiler-import", daemon=True)
        self.failed: BaseException | None = None

    def start(self) -> "CompilerImport":
        self._thread.start()
        return self

    def _run(self) -> None:
        import importlib

        try:
            for name in MODULES:
                importlib.import_module(name)
        except BaseException as e:  # the compile imports it again and raises
            self.failed = e

    def wait(self) -> None:
        self._thread.join()
