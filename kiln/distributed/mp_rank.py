"""A tensor-parallel rank in a process of its own (``torch.multiprocessing`` spawn), talking to rank 0
over a pipe (``distributed_executor_backend="mp"``, the default)."""

import time

import torch.multiprocessing as mp

from kiln.distributed import rank_server


def _main(rank: int, size: int, port: int, config, model_config, conn) -> None:
    try:
        worker = rank_server.start_rank(rank, size, port, config, model_config)
        while True:
            message = conn.recv()
            if message[0] == "stop":
                break
            reply = rank_server.handle(worker, message)
            if reply is not None:
                conn.send(reply)
    except EOFError:  # rank 0 is gone: nothing to shut down with
        return
    rank_server.stop_rank(worker)


class ProcessRank:
    def __init__(self, rank: int, size: int, port: int, config, model_config):
        self.rank = rank
        parent, child = mp.get_context("spawn").Pipe()
        self.proc = mp.get_context("spawn").Process(
            target=_main,
            args=(rank, size, port, config, model_config, child),
            name=f"kiln-tp-rank{rank}",
            daemon=True,
        )
        self.proc.start()
        child.close()
        self.conn = parent
        self.pid = self.proc.pid

    def send(self, data: bytes, reply: bool) -> None:
        self.conn.send_bytes(data)

    def poll(self, timeout: float) -> bool:
        return self.conn.poll(timeout)

    def recv(self):
        return self.conn.recv()

    def exit_reason(self) -> str | None:
        code = self.proc.exitcode
        return None if code is None else f"exited with code {code}"

    def stop(self, deadline: float) -> None:
        try:
            self.conn.send(("stop",))
        except (OSError, ValueError):
            pass
        self.proc.join(max(0.0, deadline - time.monotonic()))
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()
