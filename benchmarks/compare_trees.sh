#!/usr/bin/env bash
# Before/after check of a change: the standard speed workloads on two source trees, in one call, each run in
# a fresh process, the two trees alternating per workload so drift of the machine hits both alike.
#
#   bash benchmarks/compare_trees.sh BASE_DIR [TAG] [MODELS]
#
# BASE_DIR holds the "before" tree (e.g. `git archive <sha> | tar -x -C BASE_DIR`); the current directory is
# the "after" tree; BASE_SHA names the base tree's commit in its results. MODELS defaults to "llama-1b llama-8b". Workloads per model: batch-1 latency (128 in /
# 256 out, 3 iterations) and throughput (1000 prompts of 256 in / 256 out). Results go to
# $OUT/compare (default ./bench_out/compare) as bench_*_<TAG>_<model>_{base,new}.json, and a table of
# TPOT and total tokens/s is printed at the end (benchmarks/compare_table.py). BASE_ARGS: extra flags of
# the base tree's runs (e.g. settings that are the new tree's defaults); REPEATS (default 1): throughput
# runs per tree, alternating base / new, the repeats tagged _r2, _r3, ...
set -uo pipefail

BASE="$(cd "${1:?usage: compare_trees.sh BASE_DIR [TAG] [MODELS]}" && pwd)"
TAG="${2:-compare}"
MODELS="${3:-llama-1b llama-8b}"
cd "$(dirname "$0")/.."
NEW="$PWD"
OUT_DIR="${OUT:-$PWD/bench_out}/compare"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
EXTRA_PATH="${PYTHONPATH:-}"

run() {  # run base|new ARGS...: one kiln bench command on that tree
    local which="$1"; shift
    local tree="$NEW" sha="" extra=""
    [ "$which" = base ] && tree="$BASE" && sha="${BASE_SHA:-unknown}" && extra="${BASE_ARGS:-}"
    echo "=== $which: kiln bench $*"
    (cd "$tree" && KILN_GIT_SHA="${sha:-${KILN_GIT_SHA:-}}" PYTHONPATH="$tree${EXTRA_PATH:+:$EXTRA_PATH}" "$PY" -m kiln.cli bench "$@" $extra \
        --output-dir "$OUT_DIR" --no-progress 2>&1 | grep -v "Capturing CUDA graphs" | tail -6)
}

for model in $MODELS; do
    for which in base new; do
        run "$which" latency --model "$model" --batch-sizes 1 --input-len 128 --output-len 256 --num-iters 3 \
            --tag "${TAG}_${model}_${which}"
    done
    for r in $(seq 1 "${REPEATS:-1}"); do
        suffix=""
        [ "$r" -gt 1 ] && suffix="_r$r"
        for which in base new; do
            run "$which" throughput --model "$model" --num-prompts 1000 --input-len 256 --output-len 256 \
                --tag "${TAG}_${model}_${which}${suffix}"
        done
    done
done
"$PY" "$NEW/benchmarks/compare_table.py" "$OUT_DIR" "$TAG"
