#!/bin/bash
# Everything after the profile run, in one CPU slot: run as `/work/heavy runs/g3-all.sh` (no inner gates).
cd /work/wt-gemma3
G=/root/.cache/vcompress/models/gemma-3-270m-q4_k_m.gguf
V=.venv/bin/vcompress
S=runs/g3-stages
mkdir -p $S
step() { echo "=== $(date -u +%H:%M:%S) $*" >&2; /usr/bin/time -f "=== wall %e s, max RSS %M KiB" "$@"; echo "=== rc $?" >&2; }
EV="--format cloze --per-subject 1 --reference $G --json"
# priority 2: exports of the real model
step $V export onnx --model $G --out runs/g3-onnx-fp32 --new-tokens 16 --force
step .venv/bin/python bench/gemma3.py --genai runs/g3-onnx-fp32 --new-tokens 16
# priority 3: analyze > prune (one of the 4 query heads, within the one KV group) > distill > quantize streamed; eval after each
step $V analyze --model $G --out $S/01-analyze --parts heads --parts mlp --parts layers --samples 2 --force
step $V prune --model $G --out $S/02-prune --heads 0.25 --scores $S/01-analyze --heldout-blocks 2 --eval-per-subject 0 --force
step $V eval --model $S/02-prune $EV > $S/eval-2-prune.json
step $V distill --teacher $G --student $S/02-prune --out $S/03-distill --seq-len 128 --batch-size 2 --max-steps 30 --max-minutes 4 --save-every 10 --eval-blocks 2 --eval-per-subject 0 --force
step $V eval --model $S/03-distill $EV > $S/eval-3-distill.json
step $V quantize --model $S/03-distill --out $S/04-quantize --stream on --zero-point float --calib-samples 4 --seq-len 256 --heldout-blocks 2 --eval-per-subject 0 --force
step $V eval --model $S/04-quantize $EV > $S/eval-4-quantize.json
step $V export tensorrt --model $G --out runs/g3-trt --quant none --precision fp32 --heldout-blocks 1 --force
# the heaviest last
step timeout 1500 $V export tflite --model $G --out runs/g3-tflite --new-tokens 16 --force
