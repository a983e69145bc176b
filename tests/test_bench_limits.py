"""kiln.bench.limits: the FLOP count of a forward against torch's FLOP counter on the HF model."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kiln.bench.limits import forward_flops, gemm_tflops, kv_read_bytes, read_bandwidth

CONFIG = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)


@pytest.mark.parametrize("lm_head", [False, True])
def test_forward_flops_equal_the_counted_flops_of_the_hf_forward(lm_head):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**CONFIG, attn_implementation="eager")).eval()
    prompts, length = 3, 12
    ids = torch.randint(0, CONFIG["vocab_size"], (prompts, length))
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        if lm_head:
            model(input_ids=ids, use_cache=False)
        else:
            model.model(input_ids=ids, use_cache=False)
    counted = counter.get_total_flops()
    # HF's eager attention multiplies the full (masked) square; kiln counts the causal half
    square = prompts * length * length
    causal = prompts * length * (length + 1) // 2
    full = forward_flops(CONFIG, length, prompts, lm_head_rows=prompts * length if lm_head else 0)
    attention_gap = CONFIG["num_hidden_layers"] * 4 * CONFIG["num_attention_heads"] * CONFIG["head_dim"]
    assert counted == full + attention_gap * (square - causal)


def test_gemm_rate_is_positive_and_finite_on_the_cpu():
    rate = gemm_tflops(torch.device("cpu"), torch.float32, n=128, iters=2)
    assert 0 < rate < 1e3


def test_kv_read_bytes_sum_each_decode_steps_context():
    per_token = 2 * CONFIG["num_hidden_layers"] * CONFIG["num_key_value_heads"] * CONFIG["head_dim"] * 2
    prompt, output = 20, 7
    # the step sampling output token j (2..output) attends over prompt + j - 1 positions
    brute = sum(prompt + j - 1 for j in range(2, output + 1)) * per_token
    assert kv_read_bytes(CONFIG, prompt, output, 2) == brute
    assert kv_read_bytes(CONFIG, prompt, 1, 2) == 0  # one output token: no decode step
    assert kv_read_bytes(CONFIG, prompt, output, 1) * 2 == brute  # an fp8 cache reads half


def test_read_bandwidth_is_positive_on_the_cpu():
    assert read_bandwidth(torch.device("cpu"), nbytes=2**20, iters=2) > 0


def test_throughput_limits_count_each_request_and_compare_with_the_gemm(monkeypatch):
    import kiln.bench.limits as limits
    from kiln.bench import workload
    from kiln.bench.throughput import compute_limits

    monkeypatch.setattr(limits, "gemm_tflops", lambda device, dtype: 100.0)
    monkeypatch.setattr(limits, "read_bandwidth", lambda device: 1e12)
    wl = workload.synthetic(6, 20, 7, CONFIG["vocab_size"], seed=0, range_ratio=0.5)
    got = compute_limits(CONFIG, wl, 2.0, torch.device("cuda"), torch.bfloat16, kv_elem_bytes=2)
    flops = sum(
        forward_flops(CONFIG, len(r.prompt_token_ids) + r.output_len - 1, 1, r.output_len)
        for r in wl.requests
    )
    kv = sum(kv_read_bytes(CONFIG, len(r.prompt_token_ids), r.output_len, 2) for r in wl.requests)
    floor = flops / 100e12 + kv / 1e12
    assert got == {
        "model_flops": flops,
        "model_tflops": flops / 2.0 / 1e12,
        "gemm_tflops": 100.0,
        "fraction_of_gemm": flops / 2.0 / 1e12 / 100.0,
        "kv_read_bytes": kv,
        "read_bandwidth_Bps": 1e12,
        "floor_s": floor,
        "fraction_of_floor": floor / 2.0,
    }
    assert compute_limits(CONFIG, wl, 2.0, torch.device("cpu"), torch.float32) is None


def test_the_summary_states_the_floor(capsys, monkeypatch):
    from types import SimpleNamespace

    import kiln.bench.limits as limits
    from kiln.bench import workload
    from kiln.bench.throughput import compute_limits, print_summary

    monkeypatch.setattr(limits, "gemm_tflops", lambda device, dtype: 100.0)
    monkeypatch.setattr(limits, "read_bandwidth", lambda device: 4e12)
    wl = workload.synthetic(6, 20, 7, CONFIG["vocab_size"], seed=0, range_ratio=0.5)
    lim = compute_limits(CONFIG, wl, 1e-6, torch.device("cuda"), torch.bfloat16, kv_elem_bytes=2)
    rates = ("requests_per_s", "input_tokens_per_s", "output_tokens_per_s", "total_tokens_per_s")
    kiln = dict.fromkeys((*rates, "elapsed_s", "startup_s"), 1.0)
    kiln.update(memory={"peak_bytes": 2**30}, limits=lim)
    print_summary({"kiln": kiln}, SimpleNamespace(spec="tiny"), wl)
    out = capsys.readouterr().out
    assert f"floor {lim['floor_s']:.2f} s" in out and "TB of K/V reads at 4.00 TB/s" in out
    assert f"{100 * lim['fraction_of_floor']:.1f}% of that rate" in out
