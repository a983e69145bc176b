"""``import kiln`` stays light: the heavy optional parts load when first used, not at import."""

import json
import subprocess
import sys

LAZY = ("transformers", "triton", "gguf", "matplotlib", "kiln.bench", "safetensors", "xgrammar", "llguidance")


def test_import_kiln_loads_no_heavy_module():
    code = (
        "import json, sys, kiln; "
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {list(LAZY)!r} "
        "or m.startswith('kiln.bench'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_lazy_parts_still_load_when_used():
    code = (
        "import sys, torch; from kiln.ops.sample_argmax import sample_argmax_triton; "
        "from kiln.ops.gemv import gemv_triton; import kiln.ops.triton_gemv, kiln.ops.triton_sample_argmax; "
        "print('triton' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"
