"""The real example model: kiln's greedy output on SmolLM2-135M-Instruct equals HF transformers'."""

import os
import subprocess
import sys

import pytest
import torch

from kiln import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def hf_outputs(smollm_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(smollm_gguf), os.path.basename(smollm_gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    results = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=tok.eos_token_id
            )
        results.append(out[0, ids.shape[1] :].tolist())
    return results


def test_greedy_matches_hf_on_gguf(smollm_gguf, hf_outputs):
    with LLM(smollm_gguf, enforce_eager=True, dtype="float32") as llm:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    for out, ref in zip(outs, hf_outputs):
        n = len(out.outputs[0].token_ids)
        assert out.outputs[0].token_ids == ref[:n]  # kiln stops at EOS, HF pads after it
        assert n == len(ref) or ref[n - 1] == 2
    assert "Paris" in outs[0].outputs[0].text


def test_example_script_runs(smollm_gguf):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "examples", "offline_inference.py"), "--enforce-eager"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout
    assert "chat ->" in proc.stdout
