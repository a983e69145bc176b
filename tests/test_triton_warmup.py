"""Triton compiles a kernel once per specialisation key (constexpr values, which integer arguments are 1
or divisible by 16, which pointers are 16-byte aligned). kiln keeps those keys independent of batch
shapes and launches every remaining variant at start-up, so requests never wait for a compile."""

import importlib.util
import inspect
import random

import pytest
import torch

import kiln.ops.triton_decode as triton_decode
import kiln.ops.triton_prefill as triton_prefill
import kiln.ops.triton_sample_argmax as triton_sample_argmax
from kiln import LLM, SamplingParams, StructuredOutputsParams
from kiln.runtime.transfer import sections_to_device


def _no_specialize(kernel) -> set:
    names = getattr(kernel, "do_not_specialize", None)
    if names is None:  # the interpreter's stand-in keeps the decorator's arguments
        names = getattr(kernel, "kwargs", {}).get("do_not_specialize")
    return set(names or ())


def launch_key(kernel, args, kwargs) -> tuple:
    """What Triton's specialisation depends on for one launch."""
    names = list(inspect.signature(kernel.fn).parameters)
    skip = _no_specialize(kernel)
    key = []
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            key.append((name, value.dtype, value.data_ptr() % 16 == 0))
        elif isinstance(value, bool) or not isinstance(value, int):
            key.append((name, value if isinstance(value, bool) else type(value).__name__))
        elif name not in skip:
            key.append((name, "1" if value == 1 else "16n" if value % 16 == 0 else "int"))
    return tuple(key) + tuple(sorted(kwargs.items()))


class Recorder:
    def __init__(self, kernel):
        self.kernel, self.keys = kernel, set()

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.keys.add(launch_key(self.kernel, args, kwargs))
            return launch(*args, **kwargs)

        return run


def test_sections_start_on_16_byte_boundaries():
    for dtype in (torch.int32, torch.long):
        for lengths in [(1, 1, 3), (2, 5, 7), (3, 0, 4), (5, 6, 1)]:
            sections = [list(range(10 * i, 10 * i + n)) for i, n in enumerate(lengths)]
            views = sections_to_device(sections, torch.device("cpu"), dtype)
            assert [v.tolist() for v in views] == sections
            assert all(v.data_ptr() % 16 == 0 for v in views if v.numel())


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_requests_launch_only_variants_compiled_at_startup(arch, tiny_checkpoint, monkeypatch):
    recorders = {}
    kernels = [
        (triton_prefill, "_prefill_kernel"),
        (triton_decode, "_decode_split_kernel"),
        (triton_decode, "_decode_merge_kernel"),
    ]
    if torch.cuda.is_available():  # the sampler's kernels run on CUDA only
        kernels += [
            (triton_sample_argmax, "_chunk_best_kernel"),
            (triton_sample_argmax, "_best_chunk_kernel"),
        ]
    for module, name in kernels:
        recorders[name] = Recorder(getattr(module, name))
        monkeypatch.setattr(module, name, recorders[name])
    with LLM(
        tiny_checkpoint(arch),
        enforce_eager=True,
        dtype="float32",
        attention_config={"backend": "triton"},
        max_num_batched_tokens=48,
        block_size=8,
        max_num_seqs=8,
    ) as llm:
        at_startup = {name: set(r.keys) for name, r in recorders.items()}
        assert all(at_startup.values()), "start-up launched no attention kernel"
        rng = random.Random(0)
        shared = [rng.randrange(100, 500) for _ in range(20)]
        prompts = [
            {"prompt_token_ids": (shared if i % 3 == 0 else []) + [rng.randrange(100, 500) for _ in range(n)]}
            for i, n in enumerate([3, 40, 9, 17, 1, 26, 5, 12, 33, 7, 2, 21])
        ]
        params = [
            SamplingParams(max_tokens=rng.randrange(1, 9), temperature=i % 2, ignore_eos=True)
            for i in range(len(prompts))
        ]
        if importlib.util.find_spec("xgrammar") is not None:  # constrained rows: the masked sampler
            for i in (4, 7, 10, 11):  # greedy and random, some rows and (at the end) every row
                params[i].structured_outputs = StructuredOutputsParams(regex="[a-z]{16}")
        outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]
    for name, recorder in recorders.items():
        assert len(recorder.keys) > 0
        new = recorder.keys - at_startup[name]
        assert not new, f"{name}: {len(new)} variant(s) first launched by a request, e.g. {sorted(new)[0]}"
