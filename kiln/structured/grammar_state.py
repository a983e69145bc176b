"""``GrammarState``: one sequence's grammar matcher, created once its compiled grammar is ready and
advanced by each token the engine reads back.

kiln preempts by recomputation and keeps a preempted sequence's tokens, so its matcher (which has seen
exactly those tokens) stays valid across preemption: nothing to roll back. Tokens launched but not read
back never reach the matcher; a sequence's surplus token after a stop is dropped unseen.
"""

from __future__ import annotations

from concurrent.futures import Future

from kiln.structured.backend import GrammarBackend, Matcher


class GrammarState:
    __slots__ = ("backend", "future", "matcher", "num_accepted", "terminated")

    def __init__(self, backend: GrammarBackend, future: Future):
        self.backend, self.future = backend, future
        self.matcher: Matcher | None = None
        self.num_accepted = 0
        # the grammar accepted a stop token: the structure is complete and the sequence ends. Only an
        # accepted token changes it, so it is read from the matcher once per token, not per question
        self.terminated = False

    @property
    def ready(self) -> bool:
        """The grammar is compiled (the matcher is made on first ask); compile errors raise here."""
        if self.matcher is None and self.future.done():
            self.matcher = self.backend.matcher(self.future.result())
        return self.matcher is not None

    @property
    def active(self) -> bool:
        """Constrains the next token: compiled and not terminated (by an accepted stop token). Asked for
        every constrained row of every step: the matcher's presence is checked before ``ready``."""
        return not self.terminated and (self.matcher is not None or self.ready)

    def accept(self, token: int) -> None:
        # not ``active``, inlined: this runs for every constrained token (the property call measured
        # 57 -> 61 us per 64 rows, ``host_step.py --grammar-parts``): past the end of the grammar
        # (ignore_eos) the rest is unconstrained
        if self.terminated or (self.matcher is None and not self.ready):
            return
        if not self.matcher.accept(token):
            raise RuntimeError(
                f"token {token} rejected by the {self.backend.name} grammar after {self.num_accepted} "
                "accepted tokens, although it was sampled under the grammar's mask"
            )
        self.num_accepted += 1
        self.terminated = self.matcher.is_terminated()
