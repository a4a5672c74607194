#!/usr/bin/env bash
# The CPU-backbone design study (docs/studies.md, "Worked example 4"): the csp space against the plain AnyNetX_A
# space, each sample trained for a short equal-time budget on raccoon at 320 px with the anchor-free head, under a
# backbone budget that puts the whole detector near YOLOv8n's multiply-adds at 320 px. The two spaces grow in
# steps of STEP samples, alternately, so that an interrupted study (it resumes: run this again) always has both
# spaces at about the same n.
#
#   bash benchmarks/cpu_backbone_study.sh                 # to N=100 per space, in runs/ds/cpu
#   N=20 STEP=10 OUT=/tmp/ds bash benchmarks/cpu_backbone_study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-100}
STEP=${STEP:-10}
OUT=${OUT:-runs/ds/cpu}
SHORT=${SHORT:-90s}
FLOPS=${FLOPS:-450M:700M}   # the backbone at 320 px; PAN + head add ~0.44 G, YOLOv8n is 1.01 G in all
OVERRIDES=("train.budget=$SHORT" data.image_size=320 eval.main_metric=bbox_AP50 trainer.check_val_every_n_epoch=1000
           data.num_workers=1)
for ((n = STEP; n <= N; n += STEP)); do
    for space in csp anynetx_a; do
        .venv/bin/detkit design-space "$space" "${OVERRIDES[@]}" --n "$n" --task configs/yolo_af/raccoon.yaml \
            --budget-size 320 --flops-budget "$FLOPS" --out "$OUT"
    done
done
.venv/bin/detkit design-space --report "$OUT"
