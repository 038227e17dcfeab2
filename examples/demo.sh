#!/usr/bin/env bash
# The demo of `make demo`: weak labels → pseudomasks with the shipped teacher → a student, every step with
# its numbers. Usage: demo.sh OMNILABEL_BIN OUT_DIR   (about 4 minutes on 2 CPU cores, no GPU, no network)
set -euo pipefail
omnilabel=${1:-omnilabel}
out=${2:-demo-out}
here=$(cd "$(dirname "$0")" && pwd)
shapes=$here/shapes
teacher=$here/teacher/shapes-sam.pt
mkdir -p "$out"
start=$SECONDS

step() { printf '\n\033[1m== %s\033[0m  (%ds)\n' "$*" $((SECONDS - start)); }

step "1. the example: 60 images of textured shapes, each with one kind of label (examples/shapes/weak.json)"
"$omnilabel" validate "$shapes/weak.json" --images "$shapes/images"

step "2. a SUM refiner: it learns, on the 6 fully annotated images, how the teacher's masks differ from the GT"
"$omnilabel" finetune-teacher "$shapes/weak.json" --images "$shapes/images" --prompts refine --teacher "$teacher" \
    --steps 150 --batch-size 8 --lr 1e-4 -o "$out/refiner.pt" --overwrite

step "3. pseudomasks from the weak labels with the shipped teacher (a small SAM trained by omnilabel), each with its uncertainty map"
# No Grounding DINO here (it cannot be downloaded offline): points use SAM's own box, and the images with
# only image-level tags are left out of the output, with a warning.
"$omnilabel" pseudomask "$shapes/weak.json" --weak auto --images "$shapes/images" --teacher "$teacher" \
    --detector none --refiner "$out/refiner.pt" -o "$out/pseudo.json" --overwrite

step "4. how good are the pseudomasks? (against the full masks the weak labels were made from)"
"$omnilabel" evaluate "$out/pseudo.json" --gt "$shapes/gt.json" --json "$out/pseudo_eval.json"

step "5. pictures of the pseudomasks beside the ground truth, and their uncertainty: open $out/viz/index.html"
"$omnilabel" visualize "$out/pseudo.json" --images "$shapes/images" --gt "$shapes/gt.json" --uncertainty --html \
    -o "$out/viz"

step "6. the images to check first: most uncertain pseudomasks first (relabel.json opens in an annotation tool)"
"$omnilabel" rank "$out/pseudo.json" --top 5 -o "$out/relabel/relabel.json"

step "7. a held-out set to measure the student on (16 new images, another seed)"
"$omnilabel" synth "$out/heldout" --n 16 --seed 1

step "8. train a tiny Mask2Former student on the pseudomasks and the few full masks (CPU, a few minutes)"
"$omnilabel" train-student "$out/pseudo.json" --images "$shapes/images" --preset tiny --max-steps 1500 \
    --num-workers 0 -o "$out/student" --overwrite

step "9. the student predicts on the held-out images; score it, and draw its predictions"
"$omnilabel" predict "$out/student" --coco "$out/heldout/coco.json" --images "$out/heldout/images" \
    -o "$out/heldout/predictions.json" --num-workers 0 --overwrite
"$omnilabel" evaluate "$out/heldout/predictions.json" --gt "$out/heldout/coco.json" --json "$out/student_eval.json"
"$omnilabel" visualize "$out/heldout/predictions.json" --gt "$out/heldout/coco.json" \
    --images "$out/heldout/images" --min-score 0.5 --html -o "$out/viz-student"

step "done: everything is under $out/"
python3 - "$out/pseudo_eval.json" "$out/student_eval.json" <<'PY'
import json
import sys

teacher = json.load(open(sys.argv[1]))["teacher"]
student = json.load(open(sys.argv[2]))["segm"]
parts = [f"{w} {row['miou']:.3f} (n={row['count']})" for w, row in teacher.items() if w != "all"]
print("pseudomask mIoU against GT:  " + ",  ".join(parts))
print(f"student mask AP on held-out: {student['AP']:.3f}  (AP50 {student['AP50']:.3f})")
PY
