"""Requests added by ``LLM.enqueue`` / ``enqueue_chat`` and not yet collected by ``wait_for_completion``.

The ids are kept in the order they were enqueued; outputs of queued requests that finish while another
call (``generate``) drives the engine are kept here until ``wait_for_completion`` hands them out.
"""

from kiln.runtime.outputs import RequestOutput


class RequestQueue:
    def __init__(self) -> None:
        self.ids: list[str] = []
        self.done: dict[str, RequestOutput] = {}

    def add(self, ids: list[str]) -> None:
        self.ids.extend(ids)

    def finished(self, output: RequestOutput) -> None:
        """Keep the output of a queued request that finished."""
        self.done[output.request_id] = output

    def collect(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Every queued request's output, in enqueue order (``outputs``: those of still-pending ids,
        just run); the queue is empty afterwards."""
        self.done.update((o.request_id, o) for o in outputs)
        result = [self.done[i] for i in self.ids]
        self.clear()
        return result

    def pending(self) -> list[str]:
        """Queued ids without an output yet."""
        return [i for i in self.ids if i not in self.done]

    def clear(self) -> None:
        self.ids, self.done = [], {}

    def __len__(self) -> int:
        return len(self.ids)


def wait_for_queue(llm, output_type, use_tqdm) -> list:
    """``LLM.wait_for_completion``: run the queued requests, check the output type, collect in order."""
    if output_type is None:
        output_type = RequestOutput
    types = output_type if isinstance(output_type, tuple) else (output_type,)
    if not types or not all(isinstance(t, type) for t in types):
        raise ValueError(f"output_type must be a type or a tuple of types, got {output_type!r}")
    queue = llm._queue
    outputs = llm._run_engine(queue.pending(), use_tqdm)
    results = queue.collect(outputs)
    for out in results:
        if not isinstance(out, types):
            raise TypeError(f"output_type: expected {output_type!r}, got a {type(out).__name__}")
    return results
