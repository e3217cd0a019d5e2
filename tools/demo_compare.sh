#!/usr/bin/env bash
# Leakage mitigation in R-CNN heads on toy data: trains the toy Mask R-CNN with BatchNorm in
# its box and mask heads in 2 CPU processes (tools/train_net.py) — per-worker BN (no
# mitigation), SyncBN heads, RoI shuffle across workers — once per seed, evaluates each
# per-worker BN model once more with mini-batch statistics, and ends with tools/compare.py's
# table: mean ± sd over the seeds and the paired difference to the per-worker BN head.
# About 2.5 minutes per variant and seed (300 iterations) on an idle 2-core machine;
# interrupted, it resumes: finished runs are reused.
#
#   D2BN_PYTHON=.venv/bin/python bash tools/demo_compare.sh [OUTPUT_DIR]
#
# OUTPUT_DIR: where runs and the table go (default: $D2BN_COMPARE_OUT, else
# output/demo_compare). Environment: D2BN_PYTHON (python with d2_batchnorm's dependencies;
# default: python), D2BN_COMPARE_ITERS (training iterations per variant; default: 200),
# D2BN_COMPARE_SEEDS (compare.py's --seeds: a count K or a list S1,S2,...; default: 3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${D2BN_PYTHON:-python}"
OUT="${1:-${D2BN_COMPARE_OUT:-$ROOT/output/demo_compare}}"
OUT="$(mkdir -p "$OUT" && cd "$OUT" && pwd)"
ITERS="${D2BN_COMPARE_ITERS:-200}"
SEEDS="${D2BN_COMPARE_SEEDS:-3}"
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
cd "$ROOT"

if ! [[ "$ITERS" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: D2BN_COMPARE_ITERS = '$ITERS' is not allowed; it must be a positive integer" >&2
  exit 2
fi
# learning-rate drops at 75% and 90% of training, as in the config's 300-iteration schedule
SCHEDULE=(SOLVER.MAX_ITER "$ITERS" SOLVER.STEPS "($((ITERS * 3 / 4)),$((ITERS * 9 / 10)))")
start=$(date +%s)

echo "[demo_compare] training 3 toy Mask R-CNN variants ($ITERS iterations each, seeds $SEEDS, 2 CPU processes) into $OUT/train/runs"
set +e
"$PY" tools/compare.py --num-gpus 2 --out "$OUT/train" --timeout 3600 --seeds "$SEEDS" \
  bn_head=configs/Toy/mask_rcnn_R18_FPN_bn_head.yaml \
  syncbn_head=configs/Toy/mask_rcnn_R18_FPN_syncbn_head.yaml \
  shuffle_head=configs/Toy/mask_rcnn_R18_FPN_shuffle_head.yaml \
  -- "${SCHEDULE[@]}" | grep '^\[compare\]'
set -e

RUNS="$OUT/train/runs"
BATCH_STATS="$RUNS/bn_head_batch_stats"
for run in "$RUNS"/bn_head/seed*; do
  seed_dir="$BATCH_STATS/$(basename "$run")"
  if [[ -f "$run/model_final.pth" && ! "$seed_dir/log.txt" -nt "$run/model_final.pth" ]]; then
    echo "[demo_compare] evaluating bn_head $(basename "$run") with mini-batch statistics (2 images per worker)"
    rm -rf "$seed_dir" && mkdir -p "$seed_dir"
    "$PY" tools/train_net.py --num-gpus 2 --dist-url auto --eval-only \
      --config-file configs/Toy/mask_rcnn_R18_FPN_bn_head_batch_stats.yaml \
      MODEL.WEIGHTS "$run/model_final.pth" OUTPUT_DIR "$seed_dir" \
      > "$seed_dir/train_net.log" 2>&1 || echo "[demo_compare] mini-batch evaluation failed: see $seed_dir/train_net.log"
  fi
done

echo "[demo_compare] comparison (AP on toy_coco_val; population statistics unless stated):"
set +e
"$PY" tools/compare.py --out "$OUT" --baseline bn_head \
  --title "Toy Mask R-CNN, BN heads: leakage mitigation ($ITERS iterations)" \
  "bn_head=$RUNS/bn_head" "bn_head (mini-batch stats)=$BATCH_STATS" \
  "syncbn_head=$RUNS/syncbn_head" "shuffle_head=$RUNS/shuffle_head"
status=$?
set -e
echo "[demo_compare] done in $(( $(date +%s) - start )) s; table: $OUT/compare.md, chart: $OUT/compare.png"
exit $status
