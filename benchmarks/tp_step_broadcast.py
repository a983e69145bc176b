"""What sending each step's ``SchedulerOutput`` to the other tensor-parallel ranks costs.

    python benchmarks/tp_step_broadcast.py [--seqs 256] [--prompt 512] [--output 128] [--steps 200]
        [--backend mp|ray|both]

Rank 0 pickles the step and writes it down one pipe per other rank (``kiln/distributed/mp_rank.py``), or
passes it to one actor call per other rank (``ray_rank.py``, ``--backend ray``: a local Ray instance of
one CPU); this measures that path (pickle, send, and the receiver's unpickle, acknowledged back) for a
decode step of ``--seqs`` sequences (without and with a penalty, which makes every sequence carry its
prompt and output token lists) and for a prefill step of 8192 tokens, and prints the pickled size and
the median time per step.
"""

import argparse
import multiprocessing as mp
import pickle
import statistics
import time

from kiln.distributed.executor import step_message
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.step_data import ScheduledSequence, SchedulerOutput


def decode_step(seqs: int, prompt: int, output: int, penalty: float = 1.0) -> SchedulerOutput:
    params = SamplingParams(temperature=0.8, top_p=0.95, repetition_penalty=penalty)
    scheduled = [
        ScheduledSequence(
            seq_id=i,
            token_ids=[],
            start=prompt + output - 1,
            num_tokens=1,
            last_token_pending=True,
            block_ids=list(range(i * 40, i * 40 + (prompt + output) // 16 + 1)),
            sample=True,
            params=params,
            num_output_tokens=output,
            prompt_token_ids=list(range(prompt)),
            output_token_ids=list(range(output)),
        )
        for i in range(seqs)
    ]
    return SchedulerOutput(scheduled)


def prefill_step(tokens: int = 8192, per_seq: int = 1024) -> SchedulerOutput:
    params = SamplingParams(temperature=0)
    n = tokens // per_seq
    scheduled = [
        ScheduledSequence(i, list(range(per_seq)), 0, per_seq, False, list(range(per_seq // 16)), True,
                          params, 0, list(range(per_seq)), [])
        for i in range(n)
    ]  # fmt: skip
    return SchedulerOutput(scheduled)


def _receiver(conn) -> None:
    while True:
        message = conn.recv()
        if message is None:
            return
        conn.send_bytes(b"1")


def measure(message: tuple, steps: int) -> tuple[int, float]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(child,), daemon=True)
    proc.start()
    parent.send_bytes(pickle.dumps(message))  # untimed: the receiver has started and imported its modules
    parent.recv_bytes()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        parent.send_bytes(pickle.dumps(message))
        parent.recv_bytes()
        times.append(time.perf_counter() - start)
    parent.send(None)
    proc.join(10)
    return len(pickle.dumps(message)), statistics.median(times)


class _RayReceiver:
    def recv(self, data: bytes) -> int:
        pickle.loads(data)
        return 1


def measure_ray(message: tuple, steps: int) -> tuple[int, float]:
    import ray

    actor = ray.remote(_RayReceiver).options(num_cpus=0).remote()
    ray.get(actor.recv.remote(pickle.dumps(None)))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        ray.get(actor.recv.remote(pickle.dumps(message)))
        times.append(time.perf_counter() - start)
    ray.kill(actor)
    return len(pickle.dumps(message)), statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--output", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--backend", choices=("mp", "ray", "both"), default="mp")
    args = ap.parse_args()
    backends = ("mp", "ray") if args.backend == "both" else (args.backend,)
    if "ray" in backends:
        import ray

        ray.init(num_cpus=1, include_dashboard=False, object_store_memory=100 * 2**20)
    decode = f"decode {args.seqs} seqs x ({args.prompt}+{args.output}) tokens"
    for name, step in (
        (decode, decode_step(args.seqs, args.prompt, args.output)),
        (
            decode + ", repetition_penalty (token lists sent)",
            decode_step(args.seqs, args.prompt, args.output, 1.1),
        ),
        ("prefill 8192 tokens (8 x 1024)", prefill_step()),
    ):
        for backend in backends:
            run = measure if backend == "mp" else measure_ray
            size, median = run(step_message(step), args.steps)
            path = "pipe" if backend == "mp" else "Ray actor call"
            print(
                f"[{backend}] {name}: {size / 1024:.1f} KiB pickled, {median * 1e3:.3f} ms per step "
                f"(pickle + {path} + unpickle)"
            )
    if "ray" in backends:
        ray.shutdown()


if __name__ == "__main__":
    main()
