#!/usr/bin/env bash
# The main job's comparison: information leakage through per-worker BatchNorm in R-CNN heads,
# in the setting where it is measured to matter (projects/LeakageStudy): toy_coco_relative
# (an object's class is its gray level relative to the other objects of its image), 1 image
# per worker, so a per-worker BN head normalizes the RoIs of ONE image. It trains the toy
# Mask R-CNN with BN heads in 2 CPU processes — per-worker BN (no mitigation), SyncBN heads,
# RoI shuffle across workers — once per seed through tools/compare.py (which prints run k of
# n, iteration and ETA while each trains), evaluates each per-worker BN model once more with
# mini-batch statistics, and ends with the table (mean ± sd over the seeds, paired difference
# to the per-worker BN head), compare.py's line saying which differences are beyond their
# spread, and two lines on how to read them. Interrupted, it resumes:
# finished runs are reused.
#
#   D2BN_PYTHON=.venv/bin/python bash tools/demo_compare.sh [OUTPUT_DIR]
#
# OUTPUT_DIR: where runs and the table go (default: $D2BN_COMPARE_OUT, else
# output/demo_compare). Environment: D2BN_PYTHON (python with d2_batchnorm's dependencies;
# default: python), D2BN_COMPARE_ITERS (training iterations per run; default: 2000, the
# study's), D2BN_COMPARE_SEEDS (compare.py's --seeds: a count K or a list S1,S2,...; default: 2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${D2BN_PYTHON:-python}"
OUT="${1:-${D2BN_COMPARE_OUT:-$ROOT/output/demo_compare}}"
OUT="$(mkdir -p "$OUT" && cd "$OUT" && pwd)"
ITERS="${D2BN_COMPARE_ITERS:-2000}"
SEEDS="${D2BN_COMPARE_SEEDS:-2}"
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
cd "$ROOT"

if ! [[ "$ITERS" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: D2BN_COMPARE_ITERS = '$ITERS' is not allowed; it must be a positive integer" >&2
  exit 2
fi
DATA=(DATASETS.TRAIN '("toy_coco_relative_train",)' DATASETS.TEST '("toy_coco_relative_val",)')
# 1 image per worker; learning-rate drops at 11/15 and 9/10 of training, as in the study
TRAIN=(SOLVER.IMS_PER_BATCH 2 SOLVER.MAX_ITER "$ITERS" SOLVER.STEPS "($((ITERS * 11 / 15)),$((ITERS * 9 / 10)))")
start=$(date +%s)

echo "[demo_compare] training 3 toy Mask R-CNN variants on toy_coco_relative, 1 image per worker"
echo "[demo_compare] ($ITERS iterations each, seeds $SEEDS, 2 CPU processes) into $OUT/train/runs"
set +e
"$PY" tools/compare.py --num-gpus 2 --out "$OUT/train" --timeout 7200 --seeds "$SEEDS" \
  bn_head=configs/Toy/mask_rcnn_R18_FPN_bn_head.yaml \
  syncbn_head=configs/Toy/mask_rcnn_R18_FPN_syncbn_head.yaml \
  shuffle_head=configs/Toy/mask_rcnn_R18_FPN_shuffle_head.yaml \
  -- "${DATA[@]}" "${TRAIN[@]}" | grep --line-buffered '^\[compare\]'
set -e

RUNS="$OUT/train/runs"
BATCH_STATS="$RUNS/bn_head_batch_stats"
for run in "$RUNS"/bn_head/seed*; do
  seed_dir="$BATCH_STATS/$(basename "$run")"
  if [[ -f "$run/model_final.pth" && ! "$seed_dir/log.txt" -nt "$run/model_final.pth" ]]; then
    echo "[demo_compare] evaluating bn_head $(basename "$run") with mini-batch statistics (1 image per worker)"
    rm -rf "$seed_dir" && mkdir -p "$seed_dir"
    "$PY" tools/train_net.py --num-gpus 2 --dist-url auto --eval-only \
      --config-file configs/Toy/mask_rcnn_R18_FPN_bn_head.yaml "${DATA[@]}" \
      TEST.BN_STATS mini_batch TEST.IMS_PER_BATCH 1 \
      MODEL.WEIGHTS "$run/model_final.pth" OUTPUT_DIR "$seed_dir" \
      > "$seed_dir/train_net.log" 2>&1 || echo "[demo_compare] mini-batch evaluation failed: see $seed_dir/train_net.log"
  fi
done

echo "[demo_compare] comparison (AP on toy_coco_relative_val; population statistics unless stated):"
set +e
"$PY" tools/compare.py --out "$OUT" --baseline bn_head \
  --title "Toy Mask R-CNN, BN heads, 1 image per worker: leakage and its mitigation" \
  "bn_head=$RUNS/bn_head" "bn_head (mini-batch stats)=$BATCH_STATS" \
  "syncbn_head=$RUNS/syncbn_head" "shuffle_head=$RUNS/shuffle_head"
status=$?
set -e
echo "What it means: 'bn_head (mini-batch stats)' above bn_head beyond its spread is the leak (the head learned from"
echo "one image's batch statistics); syncbn_head and shuffle_head above it beyond theirs is what removing the leak gains."
echo "[demo_compare] done in $(( $(date +%s) - start )) s; table: $OUT/compare.md, chart: $OUT/compare.png"
exit $status
