"""Offline batch inference over a dataset with Ray Data: one kiln ``LLM`` per actor.

    python examples/ray_data_offline.py --model path/to/model --input prompts.jsonl --output out/ \
        --num-actors 2 [--num-gpus-per-actor 1] [--tensor-parallel-size 1] [--batch-size 16]

``--input``: a JSON-lines file with a ``"prompt"`` field per line (without it, a few built-in prompts).
Each of ``--num-actors`` actors builds one ``LLM`` when it starts and generates a batch of prompts per
call (``map_batches``); Ray Data streams the batches to the actors and the results to ``--output``
(JSON lines: the prompt, the generated text, the number of generated tokens). On a cluster, start Ray
on every node (``ray start --head`` / ``ray start --address=...``) and run this on one of them with
``RAY_ADDRESS`` set (or pass ``--address``): the actors spread over the nodes' GPUs.
"""

import argparse
import json
import os

import numpy as np

SAMPLE_PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "The future of AI is",
    "A recipe for bread:",
]


class KilnPredictor:
    """One ``LLM`` for the actor's lifetime; ``__call__`` generates for one batch of prompts."""

    def __init__(self, model: str, llm_kwargs: dict, sampling: dict):
        from kiln import LLM, SamplingParams

        self.llm = LLM(model=model, **llm_kwargs)
        self.params = SamplingParams(**sampling)

    def __call__(self, batch: dict) -> dict:
        prompts = [str(p) for p in batch["prompt"]]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        return {
            "prompt": np.array(prompts),
            "generated_text": np.array([o.outputs[0].text for o in outputs]),
            "num_generated_tokens": np.array([len(o.outputs[0].token_ids) for o in outputs]),
            "actor_pid": np.array([os.getpid()] * len(prompts)),
        }


def run(
    model: str,
    prompts: list[str],
    output_dir: str,
    num_actors: int = 2,
    batch_size: int = 16,
    num_gpus_per_actor: float = 0,
    num_cpus_per_actor: float = 1,
    llm_kwargs: dict | None = None,
    sampling: dict | None = None,
) -> list[dict]:
    """Generate for every prompt on ``num_actors`` actors; the rows written to ``output_dir``."""
    import ray

    ds = ray.data.from_items([{"prompt": p} for p in prompts])
    ds = ds.map_batches(
        KilnPredictor,
        fn_constructor_kwargs={
            "model": model,
            "llm_kwargs": llm_kwargs or {},
            "sampling": sampling or {"temperature": 0.0, "max_tokens": 32},
        },
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        batch_size=batch_size,
        num_gpus=num_gpus_per_actor,
        num_cpus=num_cpus_per_actor,
    )
    ds.write_json(output_dir)
    rows = []
    for name in sorted(os.listdir(output_dir)):
        if name.endswith(".json"):
            with open(os.path.join(output_dir, name)) as f:
                rows += [json.loads(line) for line in f if line.strip()]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", help="JSON lines with a 'prompt' field")
    ap.add_argument("--output", required=True, help="directory for the JSON-lines results")
    ap.add_argument("--num-actors", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-gpus-per-actor", type=float, default=None, help="default: 1 with CUDA, else 0")
    ap.add_argument("--num-cpus-per-actor", type=float, default=1)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument(
        "--address", default=None, help="a running Ray cluster (default: RAY_ADDRESS or a local one)"
    )
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local cluster this starts")
    args = ap.parse_args()

    import ray
    import torch

    if args.input:
        with open(args.input) as f:
            prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    else:
        prompts = SAMPLE_PROMPTS
    gpus = args.num_gpus_per_actor
    if gpus is None:
        gpus = args.tensor_parallel_size if torch.cuda.is_available() else 0
    llm_kwargs = {"tensor_parallel_size": args.tensor_parallel_size, "enforce_eager": args.enforce_eager}
    if args.max_model_len:
        llm_kwargs["max_model_len"] = args.max_model_len
    ray.init(address=args.address, num_cpus=args.num_cpus, include_dashboard=False)
    try:
        rows = run(
            args.model,
            prompts,
            args.output,
            num_actors=args.num_actors,
            batch_size=args.batch_size,
            num_gpus_per_actor=gpus,
            num_cpus_per_actor=args.num_cpus_per_actor,
            llm_kwargs=llm_kwargs,
            sampling={"temperature": 0.0, "max_tokens": args.max_tokens},
        )
    finally:
        ray.shutdown()
    actors = len({r["actor_pid"] for r in rows})
    print(f"{len(rows)} prompts on {actors} actors -> {args.output}")
    for r in rows[:4]:
        print(repr(r["prompt"]), "->", repr(r["generated_text"]))


if __name__ == "__main__":
    main()
