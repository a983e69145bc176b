"""The start-up timeline: every phase the worker ran, in compile_report() and in one log line."""

import logging
import time

import pytest

from kiln import LLM, SamplingParams
from kiln.runtime.startup_timeline import PHASES, StartupTimeline, process_start_time

ENGINE = dict(dtype="float32", max_num_seqs=4, max_model_len=128, kv_cache_memory_bytes=8 * 2**20)


def test_phases_add_up_to_llm_and_first_token_comes_with_the_first_step(tiny_checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="kiln"):
        llm = LLM(tiny_checkpoint("llama"), enforce_eager=True, **ENGINE)
    with llm:
        timeline = llm.compile_report().timeline
        phases = timeline["phases_s"]
        assert list(phases) == [p for p in PHASES if p in phases]  # in start-up order
        for phase in ("import", "config", "weight_load", "kv_allocate", "other"):  # CPU: no KV profile
            assert phase in phases, phase
        assert "first_token" not in phases and "dynamo" not in phases  # eager: nothing traced
        # every second of LLM() belongs to one phase (import happened before it)
        inside = sum(v for k, v in phases.items() if k != "import")
        assert inside == pytest.approx(timeline["llm_s"], abs=1e-3)
        assert timeline["ready_s"] >= timeline["llm_s"] + phases["import"] - 1e-3
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kiln start-up: ready")]
        assert len(lines) == 1 and "weight_load" in lines[0] and "config" in lines[0]
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=3), use_tqdm=False)
        first = llm.compile_report().timeline["phases_s"]["first_token"]
        assert first > 0
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=3), use_tqdm=False)
        assert llm.compile_report().timeline["phases_s"]["first_token"] == first  # recorded once
        assert "start-up (s): import" in llm.compile_report().summary()


def test_timeline_rejects_unknown_phases_and_freezes_at_ready():
    timeline = StartupTimeline()
    with pytest.raises(ValueError, match="unknown start-up phase 'warp'"):
        timeline.add("warp", 1.0)
    timeline.add("graph_capture", 1.5)
    timeline.finish(time.perf_counter(), 0.0)
    timeline.add("graph_capture", 2.0)  # a wake-up's capture is not start-up
    assert timeline.seconds["graph_capture"] == 1.5


def test_process_start_time_is_in_the_past():
    start = process_start_time()
    assert start is not None and 0 < time.time() - start < 24 * 3600


def test_eager_start_up_imports_no_compiler_and_compiled_waits_for_its_import(tiny_checkpoint):
    """Building the model on the meta device runs no torch Python reference (an embedding's
    ``normal_`` or ``to_empty``'s ``empty_like`` would import Dynamo and sympy), so an eager start-up
    imports neither (without a tokenizer: transformers' tokenizer classes import sympy themselves); a
    compiled one imports them as its own phase, right after the weight load."""
    import subprocess
    import sys

    code = (
        "import sys; from kiln import LLM; "
        f"llm = LLM({tiny_checkpoint('llama')!r}, enforce_eager=True, skip_tokenizer_init=True, "
        f"**{ENGINE!r}); "
        "print([m for m in ('torch._dynamo', 'sympy', 'torch._inductor') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    llm = LLM(tiny_checkpoint("llama"), compilation_config=3, **ENGINE)
    with llm:
        phases = llm.compile_report().timeline["phases_s"]
        assert list(phases).index("compiler_import") == list(phases).index("weight_load") + 1
