#!/usr/bin/env bash
# tokenpatch eval of the real DeiT-Tiny on a GPU, full precision against --amp bf16, on the 500
# shared images: top-1, agreement and the scoring time (images/s = images / seconds) of each, as
# results.json files under ${OUT:-benchmarks/results}/gpu_eval/{fp32,bf16}. One device call:
#     TOKENPATCH_DATA=<shared data> bash benchmarks/gpu_eval.sh    (DEVICE=cpu tries it without a GPU)
set -euo pipefail
data=${TOKENPATCH_DATA:?set TOKENPATCH_DATA to the folder with weights/ and imagenet-sample/}
out=${OUT:-benchmarks/results}/gpu_eval
for precision in fp32 bf16; do
    amp=()
    if [ "$precision" = bf16 ]; then amp=(--amp bf16); fi
    python -m tokenpatch.cli eval deit_tiny_patch16_224 --checkpoint "$data/weights/deit_tiny_patch16_224.safetensors" \
        --data "$data/imagenet-sample" --methods tome evit idle -j 8 --batch-size 250 --device "${DEVICE:-cuda}" "${amp[@]}" \
        --output "$out/$precision"
done
