#!/usr/bin/env bash
# GPU runs of the feature benchmarks and of the GPU tests, in parts that each fit a 10-minute command.
#
#   bash benchmarks/run_h200_features.sh PART [PART ...]
#
# PARTs:
#   tests       pytest -m gpu on every file but the three below, GPU_TEST_WORKERS (default 4) pytest-xdist
#               workers sharing the GPU (tests/conftest.py caps each worker's KV cache)
#   tests-serial pytest -m gpu on test_worker, test_compile_cache and test_cudagraph (they check the KV budget
#               and graph memory themselves)
#   streaming   AsyncLLM at 64 streams vs LLM.generate, TTFT at batch 1 (llama-1b); again with --handoff-wait 0
#   soak        AsyncLLM soak: 10,000 requests from 200 coroutines, random lengths and aborts (llama-1b)
#   beam        beam search, 64 prompts x width 4 x 128 new tokens vs HF generate(num_beams=4) (llama-1b)
#   structured  JSON-schema constrained vs unconstrained tokens/s, batch-1 TPOT (llama-1b, then llama-8b;
#               needs TOKENIZER)
#   pooling     embeddings, 10,000 x 256 vs HF batched forward (POOL_MODELS, default llama-1b)
#   lora        LoRA batch-1/throughput, adapter swaps, batch-1 kernel profile (LORA_MODEL, default llama-8b)
#   lora-kernels the LoRA kernels per projection (llama-1b, llama-8b; batch 1/4/16/64): the plan and each plan forced,
#               and the expand from a base weight carrying every slot's A (--stacked)
#   fp8         bf16 vs fp8 vs fp8 + fp8 KV (llama-1b, both parts)
#   fp8-gemv    bf16 vs fp8 batch-1 TPOT (llama-1b) with the static size-1 compile and its GEMVs
#               (fuse_gemv, fuse_fp8_gemv), results in $OUT/fp8_gemv
#   sleep       sleep(1) / wake_up memory and time (llama-8b)
#   warm        llama-1b throughput with 256 warm-up prompts on this tree and on BASE (a before/after tree;
#               BASE_SHA names its commit in the results)
#   smoke       pytest tests/test_bench_scripts.py: every benchmark script on a tiny model with the flags
#               used here, on this machine's GPU (a script that would crash on a part above fails here first)
#   startup     random llama-1b / llama-8b checkpoints written to /tmp (with TOKENIZER's files, so a start-up
#               loads a tokenizer as from a real checkpoint), then `kiln bench compile` cold and warm from
#               disk, with and without reuse_dynamo_graph, and the weight-loading rate
#   startup-bytecode the startup part's `kiln bench compile` runs with Python's bytecode cache on (PYTHONPYCACHEPREFIX,
#               PYTHONDONTWRITEBYTECODE unset), as a pip install that keeps .pyc files has it: one run fills the
#               bytecode, the next (fresh compile cache, cold then warm) is the one reported (*_bytecode.json)
#   startup-floor import torch, the CUDA context, import kiln and a plain safetensors read of each of those
#               checkpoints, in fresh processes: what a start-up pays before kiln's own phases
#
# Results go to $OUT (default ./bench_out); each part's log is $OUT/<part>.log. TOKENIZER: a tokenizer
# folder (default ./.tok). Python packages the machine lacks (pydantic, xgrammar, ...) are installed from
# wheels in ./.whl when that folder is there.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
TOK="${TOKENIZER:-$PWD/.tok}"
export KILN_TEST_TOKENIZER_DIR="$TOK"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kiln-site \
        .whl/*.whl >/dev/null 2>&1
    export PYTHONPATH="$PWD:/tmp/kiln-site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

part() {
    case "$1" in
    tests) "$PY" -m pytest -q -p no:cacheprovider --durations=15 -m gpu -n "${GPU_TEST_WORKERS:-4}" tests \
        --ignore=tests/test_worker.py --ignore=tests/test_compile_cache.py --ignore=tests/test_cudagraph.py ;;
    tests-serial)
        "$PY" -m pytest -q -p no:cacheprovider --durations=15 -m gpu tests/test_worker.py tests/test_compile_cache.py \
            tests/test_cudagraph.py ;;
    streaming) "$PY" benchmarks/streaming.py --model llama-1b --streams 64 --out "$OUT/bench_streaming_llama-1b.json"
        "$PY" benchmarks/streaming.py --model llama-1b --streams 64 --handoff-wait 0 \
            --out "$OUT/bench_streaming_llama-1b_no_handoff_wait.json" ;;
    soak) "$PY" benchmarks/async_soak.py --model llama-1b --requests 10000 --coroutines 200 \
        --out "$OUT/bench_async_soak_llama-1b.json" ;;
    beam) "$PY" benchmarks/beam_search.py --model llama-1b --prompts 64 --width 4 --new-tokens 128 \
        --out "$OUT/bench_beam_search_llama-1b.json" ;;
    structured) for m in llama-1b llama-8b; do
            "$PY" benchmarks/structured.py --model "$m" --tokenizer "$TOK" --output-dir "$OUT" || return 1
        done ;;
    pooling) local pm="${POOL_MODELS:-llama-1b}"
        "$PY" benchmarks/pooling.py --models "$pm" --output "$OUT/bench_pooling_${pm//,/_}.json" ;;
    lora) "$PY" benchmarks/lora.py --model "${LORA_MODEL:-llama-8b}" --tag h200 --output-dir "$OUT" --profile ;;
    lora-kernels) "$PY" benchmarks/lora_kernels.py --models llama-1b,llama-8b --sweep --stacked \
        --output "$OUT/bench_lora_kernels_h200.json" ;;
    fp8) "$PY" benchmarks/fp8.py --models llama-1b --output-dir "$OUT" ;;
    fp8-gemv) "$PY" benchmarks/fp8.py --models llama-1b --variants bf16,fp8 --parts latency \
        --output-dir "$OUT/fp8_gemv" \
        -cc '{"compile_sizes": [1], "pass_config": {"fuse_gemv": true, "fuse_fp8_gemv": true}}' ;;
    sleep) "$PY" benchmarks/sleep_mode.py --model llama-8b --level 1 --out "$OUT/bench_sleep_llama-8b.json" ;;
    warm)
        local base="${BASE:?warm needs BASE=<before tree>}"
        local i=0
        for which in base new base new; do
            i=$((i + 1))
            local tree="$PWD"
            [ "$which" = base ] && tree="$base"
            local sha=""
            [ "$which" = base ] && sha="${BASE_SHA:-unknown}"
            (cd "$tree" && KILN_GIT_SHA="$sha" PYTHONPATH="$tree:/tmp/kiln-site" "$PY" -m kiln.cli bench throughput --model llama-1b \
                --num-prompts 1000 --input-len 256 --output-len 256 --num-warmup-prompts 256 --no-progress \
                --tag "warm256_${which}_$i" --output-dir "$OUT" 2>&1 | grep "tok/s")
        done ;;
    smoke) "$PY" -m pytest -q -p no:cacheprovider tests/test_bench_scripts.py ;;
    startup)
        for m in llama-1b llama-8b; do
            [ -f "/tmp/ckpt-$m/config.json" ] || "$PY" benchmarks/weight_loading.py make "/tmp/ckpt-$m" --shape "$m" \
                --tokenizer "$TOK"
            "$PY" benchmarks/weight_loading.py load "/tmp/ckpt-$m" --device cuda --out "$OUT/weight_loading_h200_$m.json"
            "$PY" -m kiln.cli bench compile --model "/tmp/ckpt-$m" --load-tokenizer --output-dir "$OUT" \
                --tag "${m}_disk"
            "$PY" -m kiln.cli bench compile --model "/tmp/ckpt-$m" --load-tokenizer -cc '{"reuse_dynamo_graph": true}' \
                --output-dir "$OUT" --tag "${m}_disk_reuse"
        done ;;
    startup-bytecode)
        export PYTHONPYCACHEPREFIX="${PYCACHE:-/tmp/kiln-pycache}"
        unset PYTHONDONTWRITEBYTECODE
        for m in llama-1b llama-8b; do
            [ -f "/tmp/ckpt-$m/config.json" ] || "$PY" benchmarks/weight_loading.py make "/tmp/ckpt-$m" --shape "$m" \
                --tokenizer "$TOK"
            for tag in fill bytecode; do
                "$PY" -m kiln.cli bench compile --model "/tmp/ckpt-$m" --load-tokenizer --output-dir "$OUT" \
                    --tag "${m}_disk_$tag"
            done
        done ;;
    startup-floor)
        for m in llama-1b llama-8b; do
            [ -f "/tmp/ckpt-$m/config.json" ] || "$PY" benchmarks/weight_loading.py make "/tmp/ckpt-$m" --shape "$m"
            "$PY" benchmarks/startup_floor.py --repeats 3 --model "/tmp/ckpt-$m" --out "$OUT/startup_floor_$m.json"
        done ;;
    *) echo "unknown part $1"; return 2 ;;
    esac
}

for p in "$@"; do
    echo "=== $p"
    t0=$SECONDS
    part "$p" 2>&1 | tee "$OUT/$p.log" | grep -E "passed|failed|FAILED|tok/s|wrote|Error" | tail -20
    echo "=== $p took $((SECONDS - t0)) s"
done
