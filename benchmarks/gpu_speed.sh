#!/usr/bin/env bash
# The GPU speed of every method, in one call of a lent device machine (at most BUDGET_S seconds,
# default 450): each step below gets what is left of the budget and is skipped when under 30 s
# remain, so the steps come in order of what matters most.
#   1. every method at 65 % of the MACs, DeiT-S and ViT-B, float16 and bfloat16, batch 1 (latency)
#      and 256 (images/s), eager: throughput.py, measured/ideal beside each
#   2. proportional attention's bias as a mask against folded into the heads (tome, ppt; DeiT-S fp16)
#   3. where the time goes, by op kind and SDPA kernel (DeiT-S fp16, batch 1 and 256): profile_breakdown.py
#   4. compiled and in CUDA graphs (DeiT-S fp16, batch 1 and 256)
# Usage: bash benchmarks/gpu_speed.sh    (DEVICE=cpu tries the plumbing). Needs torch with CUDA, timm and
# fvcore importable (fvcore is pure Python: carry its site folder).
# The JSON files go to $OUT when it is set (the device tool's), else to benchmarks/results; each names the device.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
deadline=$((SECONDS + ${BUDGET_S:-450}))

step() {  # step NAME COMMAND...: run COMMAND in what is left of the budget, or say it was skipped
    local name=$1 left=$((deadline - SECONDS))
    shift
    if [ "$left" -lt 30 ]; then echo "skipped $name: the budget is spent"; return; fi
    echo "== $name ($left s left)"
    timeout "$left" "$@" || echo "step $name ended with status $?"
}

device=${DEVICE:-cuda}
timing=(--device "$device" --macs-ratio 0.65 --batch-sizes 1 256 --repeats 10 --warmup 3)
for model in deit_small_patch16_224 vit_base_patch16_224; do
    for dtype in float16 bfloat16; do
        step "eager $model $dtype" python3 benchmarks/throughput.py "${timing[@]}" --model "$model" --dtype "$dtype" \
            --modes eager --json "$out/gpu_${model}_${dtype}_eager.json"
    done
done
step "key bias as a mask" python3 benchmarks/throughput.py "${timing[@]}" --model deit_small_patch16_224 \
    --dtype float16 --methods tome ppt --key-bias mask --json "$out/gpu_deit_small_patch16_224_float16_mask.json"
for batch in 1 256; do
    step "profile batch $batch" python3 benchmarks/profile_breakdown.py --device "$device" --dtype float16 \
        --model deit_small_patch16_224 --methods $(python3 -c "import tokenpatch; print(*tokenpatch.available_methods())") \
        --batch-size "$batch" --rounds 5 --json "$out/gpu_profile_deit_small_b$batch.json"
done
[ "$device" = cuda ] || exit 0  # CUDA graphs exist only on a GPU
step "compiled" python3 benchmarks/throughput.py "${timing[@]}" --model deit_small_patch16_224 --dtype float16 \
    --modes compiled cudagraphs --json "$out/gpu_deit_small_patch16_224_float16_compiled.json"
