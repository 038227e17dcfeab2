#!/usr/bin/env bash
# The demo of `make demo`: every step prints its numbers. Usage: demo.sh OMNILABEL_BIN OUT_DIR
set -euo pipefail
omnilabel=${1:-omnilabel}
out=${2:-demo-out}
mkdir -p "$out"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. a synthetic, fully annotated dataset (40 images of textured shapes)"
"$omnilabel" synth "$out/shapes" --n 40 --seed 0

step "2. simulate weak labels: masks on 10% of the images, one point per object elsewhere"
"$omnilabel" split "$out/shapes/coco.json" --fully 0.1 --weak points --seed 0 -o "$out/shapes/weak.json"

step "3. check the weak file and every image it names"
"$omnilabel" validate "$out/shapes/weak.json" --images "$out/shapes/images"

step "4. score the ground truth against itself (AP must be 1.0)"
"$omnilabel" evaluate "$out/shapes/coco.json" --gt "$out/shapes/coco.json"

step "5. a held-out set to measure the student on (16 new images, another seed)"
"$omnilabel" synth "$out/heldout" --n 16 --seed 1

step "6. train a tiny Mask2Former student on the 40 annotated images (CPU, about a minute)"
"$omnilabel" train-student "$out/shapes/coco.json" --images "$out/shapes/images" --preset tiny --max-steps 600 --num-workers 0 \
    -o "$out/student" --overwrite

step "7. predict on the held-out images, then score them"
"$omnilabel" predict "$out/student" --coco "$out/heldout/coco.json" --images "$out/heldout/images" \
    -o "$out/heldout/predictions.json" --num-workers 0 --overwrite
"$omnilabel" evaluate "$out/heldout/predictions.json" --gt "$out/heldout/coco.json"
