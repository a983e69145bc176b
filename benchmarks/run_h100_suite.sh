#!/usr/bin/env bash
# The GPU benchmark suite behind benchmarks/README.md, for the H100 machine.
#
#   bash benchmarks/run_h100_suite.sh [PART ...]
#
# PARTs (default: all, in this order):
#   throughput   llama-8b and llama-1b, 1000 prompts of 256 in / 256 out, kiln vs HF (eager, static-compile)
#   latency      llama-8b and llama-1b, batch 1/8/64, 256 in / 256 out, kiln vs HF
#   compile      llama-8b and llama-1b start-up, cold vs warm compile caches
#   sweep        llama-1b over benchmarks/sweep_configs.json (one fresh process per config); or in three
#                shorter parts: sweep-modes, sweep-passes, sweep-capture (SWEEP_ONLY=a,b,c picks configs)
#   smoke        llama-1b, 100 prompts of 128/128 and batch-1 latency, eager (a quick check that the tools run)
#   gemv         benchmarks/gemv.py --sweep for llama-1b and llama-8b (batch-1 products, every block-size config)
#   latency-gemv batch-1 latency of llama-1b and llama-8b with fuse_gemv (static size-1 compile, no tuning)
#                next to HF static cache + compile
#
# Results go to $OUT/results (default ./bench_out/results) and are bundled into
# $OUT/bench_results_<parts>.tar.gz next to suite.log, so only a couple of files need copying back.
# One part can take several minutes: where a single command has a time limit, run the parts in separate
# calls. KILN_GIT_SHA names the source commit when the tree is a copy without .git.
# Environment knobs: PYTHON (default python3), EXTRA_ARGS (appended to every kiln bench command).
# Python packages missing on the machine (pydantic, which kiln.compiler.config needs) are installed from
# wheels in ./.whl when that folder is there; fetch them beforehand on a machine with pip and carry .whl:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl pydantic pydantic_core annotated-types typing-inspection
# (pin the versions `pip show pydantic` reports locally; pydantic and pydantic_core must match).
# One call: run(command="KILN_GIT_SHA=<sha> bash benchmarks/run_h100_suite.sh throughput", carry=[".whl"]).
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench_out}"
RES="$OUT/results"
mkdir -p "$RES"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export KILN_GIT_SHA="${KILN_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
LOG="$OUT/suite.log"
if ! "$PY" -c "import pydantic" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kiln-site \
        .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/kiln-site"
fi
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(throughput latency compile sweep)
FAILED=()

bench() {  # bench NAME ARGS...: one kiln bench command, logged; a failure does not stop the suite
    local name="$1"; shift
    echo "=== $name: kiln bench $* ${EXTRA_ARGS:-}" | tee -a "$LOG"
    local t0=$SECONDS
    # shellcheck disable=SC2086
    if ! "$PY" -m kiln.cli bench "$@" --output-dir "$RES" ${EXTRA_ARGS:-} 2>&1 | tee -a "$LOG"; then
        FAILED+=("$name")
        echo "=== $name FAILED" | tee -a "$LOG"
    fi
    echo "=== $name took $((SECONDS - t0)) s" | tee -a "$LOG"
}

script() {  # script NAME FILE ARGS...: one benchmarks/*.py run, logged like bench
    local name="$1"; shift
    echo "=== $name: $*" | tee -a "$LOG"
    local t0=$SECONDS
    if ! "$PY" "$@" 2>&1 | tee -a "$LOG"; then
        FAILED+=("$name")
        echo "=== $name FAILED" | tee -a "$LOG"
    fi
    echo "=== $name took $((SECONDS - t0)) s" | tee -a "$LOG"
}

GEMV_CC='{"compile_sizes": [1], "pass_config": {"fuse_gemv": true}}'

{
    echo "kiln suite: parts ${PARTS[*]}; sha $KILN_GIT_SHA; $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__,
"transformers", transformers.__version__, "cuda", torch.cuda.is_available())'
} 2>&1 | tee -a "$LOG"

for part in "${PARTS[@]}"; do
    case "$part" in
    throughput)
        for shape in llama-8b llama-1b; do
            bench "throughput-$shape" throughput --model "$shape" --num-prompts 1000 --input-len 256 \
                --output-len 256 --compare hf --tag "${shape}_1000x256x256"
        done
        ;;
    latency)
        for shape in llama-8b llama-1b; do
            bench "latency-$shape" latency --model "$shape" --batch-sizes 1,8,64 --input-len 256 \
                --output-len 256 --num-iters 3 --compare hf --tag "$shape"
        done
        ;;
    compile)
        for shape in llama-8b llama-1b; do
            bench "compile-$shape" compile --model "$shape" --batch-size 8 --input-len 256 --output-len 32 \
                --tag "$shape"
        done
        ;;
    sweep | sweep-modes | sweep-passes | sweep-capture)
        only="${SWEEP_ONLY:-}"
        case "$part" in
        sweep-modes) only="eager,dynamo-only,inductor-no-graphs,piecewise-no-graphs,piecewise,full,full-and-piecewise" ;;
        sweep-passes) only="full-and-piecewise,passes-off,fuse-add-rms-norm,fuse-silu-mul,fusions-on" ;;
        sweep-capture) only="full-and-piecewise,capture-pow2,capture-dense,static-bs1,static-bs1-untuned,static-bs1-gemv" ;;
        esac
        tag="llama-1b${part#sweep}"
        bench "$part-llama-1b" sweep --model llama-1b --configs benchmarks/sweep_configs.json \
            ${only:+--only "$only"} --batch-sizes 1,8,64 --input-len 256 --output-len 128 --num-iters 2 \
            --num-prompts 200 --timeout 900 --tag "$tag"
        ;;
    gemv)
        for shape in llama-1b llama-8b; do
            script "gemv-$shape" benchmarks/gemv.py --model "$shape" --sweep --output "$RES/gemv_sweep_${shape}_h100.json"
        done
        ;;
    latency-gemv)
        for shape in llama-1b llama-8b; do
            script "latency-gemv-$shape" benchmarks/latency.py --models "$shape" --output-dir "$RES" \
                -cc "$GEMV_CC" --hf-variants static-compile --tag "${shape}_gemv1" ${EXTRA_ARGS:-}
        done
        ;;
    smoke)
        bench "smoke-throughput" throughput --model llama-1b --num-prompts 100 --input-len 128 --output-len 128 \
            --enforce-eager --compare hf --hf-variants eager --tag llama-1b_100x128x128_eager
        bench "smoke-latency" latency --model llama-1b --batch-sizes 1 --input-len 128 --output-len 128 \
            --num-iters 3 --enforce-eager --tag llama-1b_bs1_eager
        ;;
    *)
        echo "unknown part $part (throughput, latency, compile, sweep[-modes|-passes|-capture], smoke, gemv, latency-gemv)" | tee -a "$LOG"
        FAILED+=("$part")
        ;;
    esac
done

bundle="$OUT/bench_results_$(IFS=_; echo "${PARTS[*]}").tar.gz"
tar czf "$bundle" -C "$OUT" results suite.log && rm -rf "$RES"
echo "bundle: $bundle" | tee -a "$LOG"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "failed: ${FAILED[*]}" | tee -a "$LOG"
    exit 1
fi
