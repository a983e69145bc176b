#!/usr/bin/env bash
# GPU runs of the feature benchmarks and of the GPU tests, in parts that each fit a 10-minute command.
#
#   bash benchmarks/run_h200_features.sh PART [PART ...]
#
# PARTs:
#   tests-a     pytest -m gpu: attention, worker, sampler, fp8 KV, prompt validation, cudagraph, gemv
#               (253 s on the H200)
#   tests-b     pytest -m gpu: profiler, metrics, pooling, structured outputs, fp8, fusion passes, async, lora
#               (async, lora, structured and fp8 alone ran past 250 s: give it a call of its own)
#   streaming   AsyncLLM at 64 streams vs LLM.generate, TTFT at batch 1 (llama-1b)
#   beam        beam search, 64 prompts x width 4 x 128 new tokens vs HF generate(num_beams=4) (llama-1b)
#   structured  JSON-schema constrained vs unconstrained tokens/s, batch-1 TPOT (llama-1b; needs TOKENIZER)
#   pooling     embeddings, 10,000 x 256 vs HF batched forward (llama-1b)
#   lora        LoRA batch-1/throughput and adapter swaps (llama-8b)
#   fp8         bf16 vs fp8 vs fp8 + fp8 KV (llama-1b, both parts)
#   sleep       sleep(1) / wake_up memory and time (llama-8b)
#   warm        llama-1b throughput with 256 warm-up prompts on this tree and on BASE (a before/after tree;
#               BASE_SHA names its commit in the results)
#   tests-c     pytest -m gpu: beam search, compile cache, weight loading, start-up timeline, KV profile,
#               import, compiler
#   smoke       pytest tests/test_bench_scripts.py: every benchmark script on a tiny model with the flags
#               used here, on this machine's GPU (a script that would crash on a part above fails here first)
#   startup     random llama-1b / llama-8b checkpoints written to /tmp, then `kiln bench compile` cold and
#               warm from disk, with and without reuse_dynamo_graph, and the weight-loading rate
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
    tests-a) "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_triton_attention.py tests/test_worker.py \
        tests/test_sampler.py tests/test_kv_cache_fp8.py tests/test_prompt_validation.py tests/test_cudagraph.py \
        tests/test_gemv.py tests/test_triton_warmup.py ;;
    tests-b) "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_profiler.py tests/test_metrics.py \
        tests/test_pooling.py tests/test_structured_outputs.py tests/test_quant_fp8.py tests/test_pass_fusion.py \
        tests/test_pass_fusion_quant.py tests/test_async_llm.py tests/test_lora_gpu.py ;;
    streaming) "$PY" benchmarks/streaming.py --model llama-1b --streams 64 --out "$OUT/bench_streaming_llama-1b.json" ;;
    beam) "$PY" benchmarks/beam_search.py --model llama-1b --prompts 64 --width 4 --new-tokens 128 \
        --out "$OUT/bench_beam_search_llama-1b.json" ;;
    structured) "$PY" benchmarks/structured.py --model llama-1b --tokenizer "$TOK" --output-dir "$OUT" ;;
    pooling) "$PY" benchmarks/pooling.py --models llama-1b --output "$OUT/bench_pooling_llama-1b.json" ;;
    lora) "$PY" benchmarks/lora.py --model llama-8b --tag h200 --output-dir "$OUT" ;;
    fp8) "$PY" benchmarks/fp8.py --models llama-1b --output-dir "$OUT" ;;
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
    tests-c) "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_beam_search.py tests/test_beam_fork.py \
        tests/test_compile_cache.py tests/test_weight_loading.py tests/test_startup_timeline.py \
        tests/test_kv_profile.py tests/test_import.py tests/test_compiler.py ;;
    smoke) "$PY" -m pytest -q -p no:cacheprovider tests/test_bench_scripts.py ;;
    startup)
        for m in llama-1b llama-8b; do
            [ -f "/tmp/ckpt-$m/config.json" ] || "$PY" benchmarks/weight_loading.py make "/tmp/ckpt-$m" --shape "$m"
            "$PY" benchmarks/weight_loading.py load "/tmp/ckpt-$m" --device cuda --out "$OUT/weight_loading_h200_$m.json"
            "$PY" -m kiln.cli bench compile --model "/tmp/ckpt-$m" --output-dir "$OUT" --tag "${m}_disk"
            "$PY" -m kiln.cli bench compile --model "/tmp/ckpt-$m" -cc '{"reuse_dynamo_graph": true}' \
                --output-dir "$OUT" --tag "${m}_disk_reuse"
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
