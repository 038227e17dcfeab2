#!/usr/bin/env bash
# Reproduce examples/teacher/shapes-sam.pt: a small SAM trained from scratch on synthetic shapes.
# Usage: examples/teacher/train.sh [WORK_DIR] [OMNILABEL_BIN]   (about 40 minutes on 2 CPU cores)
set -euo pipefail
work=${1:-shapes-teacher-work}
omnilabel=${2:-omnilabel}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$work"

# 1. an untrained SAM: 4 ViT blocks 128 wide on 8-px patches at 128 px, 128-wide decoder (2.6 M parameters)
"$omnilabel" weights init-sam "$work/shapes-sam-init.pth" --seed 0
# 2. 2,000 training scenes (seed 1000; the demo's example uses seed 0, the test of this teacher seed 7)
"$omnilabel" synth "$work/train" --n 2000 --seed 1000
# 3. train encoder, prompt encoder and decoder together, with point, box and point+box prompts
"$omnilabel" finetune-teacher "$work/train/coco.json" --images "$work/train/images" \
    --sam "$work/shapes-sam-init.pth" --train-encoder --prompts points+boxes \
    --steps 8000 --batch-size 8 --lr 5e-4 --checkpoint-every 500 --seed 0 \
    --job-dir "$work/run" -o "$here/shapes-sam.pt"
