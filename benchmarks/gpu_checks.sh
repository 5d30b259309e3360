#!/usr/bin/env bash
# The GPU half of the speed table (README "GPU"), in two stages that each fit one call of a lent
# device machine:
#   bash benchmarks/gpu_checks.sh eager     # every method, float16 and bfloat16, batch 1 and 256
#   bash benchmarks/gpu_checks.sh compiled  # idle, tome and evit compiled and in CUDA graphs, float16
# Needs torch with CUDA, timm and fvcore importable (fvcore is pure Python: carry its site folder);
# the JSON files go to $OUT when it is set (the device tool's), else to benchmarks/results.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
common=(--device cuda --batch-sizes 1 256 --repeats 15 --warmup 5)
case "${1:-}" in
    eager)
        for dtype in float16 bfloat16; do
            python3 benchmarks/throughput.py "${common[@]}" --dtype "$dtype" --modes eager \
                --json "$out/throughput_cuda_${dtype}_eager.json"
        done ;;
    compiled)
        python3 benchmarks/throughput.py "${common[@]}" --dtype float16 --methods idle tome evit \
            --modes compiled cudagraphs --json "$out/throughput_cuda_float16_compiled.json" ;;
    *)
        echo "usage: bash benchmarks/gpu_checks.sh eager|compiled" >&2
        exit 2 ;;
esac
