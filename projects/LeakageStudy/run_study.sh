#!/usr/bin/env bash
# Information leakage through per-worker BatchNorm in R-CNN heads, and its mitigation
# ("Rethinking 'Batch' in BatchNorm", Sec. 6), on a toy dataset where it pays off:
# toy_coco_relative (an object's class — dark, medium, light — is its gray level relative
# to the other objects of its image; a BN head that normalizes one image's RoIs gets that
# difference from its batch statistics, population statistics cannot supply it).
#
# Two settings: 1 image per worker (2000 iterations; a per-worker BN head normalizes the
# RoIs of one image) and 2 images per worker (1000 iterations, the same number of images;
# the paper's 2 images per GPU). For each head variant it trains the toy Mask R-CNN
# (configs/Toy/mask_rcnn_R18_FPN_<variant>_head.yaml) in 2 CPU processes through
# tools/train_net.py, and measures on held-out images:
#   1. COCO AP with population statistics (end of training) and with mini-batch statistics
#      (train-mode BN at inference, as many images per worker as in training; an --eval-only run);
#   2. the leakage probe (leakage_probe.py): training-style batches (sampled RoIs, losses)
#      with batch statistics vs. population statistics.
# Then summarize.py writes results/results.{md,csv,png}.
#
#   bash projects/LeakageStudy/run_study.sh [OUTPUT_DIR]      (default: output/leakage_study)
#
# Environment: D2BN_PYTHON (default: .venv/bin/python); D2BN_STUDY_SETTINGS (default
# "1img:1:2000:bn,shuffle,syncbn,gn,nonorm 2img:2:1000:bn,shuffle,syncbn", each
# NAME:IMAGES_PER_WORKER:ITERATIONS:VARIANTS, variants among bn, syncbn, shuffle, gn, nonorm);
# D2BN_STUDY_DATASET (default toy_coco_relative; its _train and _val splits are used);
# D2BN_STUDY_SEEDS (default "1 2 3": every run once per SEED, into <run>/seed<S>; seeds
# outermost, so an interrupted study has whole seeds); D2BN_STUDY_REUSE=1 keeps finished
# runs of OUTPUT_DIR instead of retraining them; D2BN_STUDY_RESULTS (default
# projects/LeakageStudy/results) is where summarize.py writes the tables and the plot.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="${D2BN_PYTHON:-$ROOT/.venv/bin/python}"
OUT="${1:-$ROOT/output/leakage_study}"
SETTINGS="${D2BN_STUDY_SETTINGS:-1img:1:2000:bn,shuffle,syncbn,gn,nonorm 2img:2:1000:bn,shuffle,syncbn}"
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
cd "$ROOT"
mkdir -p "$OUT"

DATASET="${D2BN_STUDY_DATASET:-toy_coco_relative}"
DATA=(DATASETS.TRAIN "(\"${DATASET}_train\",)" DATASETS.TEST "(\"${DATASET}_val\",)")
SEEDS="${D2BN_STUDY_SEEDS:-1 2 3}"
for seed in $SEEDS; do
  if ! [[ "$seed" =~ ^[0-9]+$ ]]; then
    echo "error: D2BN_STUDY_SEEDS = '$SEEDS' is not allowed; it must be integers >= 0 separated by spaces" >&2
    exit 2
  fi
done
RUN_DIRS=()
for seed in $SEEDS; do
for setting in $SETTINGS; do
  IFS=: read -r name ims iters variants <<< "$setting"
  if ! [[ "$ims" =~ ^[1-9][0-9]*$ && "$iters" =~ ^[1-9][0-9]*$ && -n "$variants" ]]; then
    echo "error: setting '$setting' is not NAME:IMAGES_PER_WORKER:ITERATIONS:VARIANTS" >&2
    exit 2
  fi
  # each rank evaluates with its own running statistics, as when the study was measured
  # (BN.EMA_ACROSS_WORKERS average, the default, evaluates their mean: tools/demo_compare.sh)
  TRAIN=(SOLVER.IMS_PER_BATCH $((2 * ims)) SOLVER.MAX_ITER "$iters"
         SOLVER.STEPS "($((iters * 11 / 15)),$((iters * 9 / 10)))" SEED "$seed"
         BN.EMA_ACROSS_WORKERS per_worker)
  for variant in ${variants//,/ }; do
    config="configs/Toy/mask_rcnn_R18_FPN_${variant}_head.yaml"
    if [[ ! -f "$config" ]]; then
      echo "error: unknown variant '$variant' (no $config); known: bn syncbn shuffle gn nonorm" >&2
      exit 2
    fi
    run="$OUT/$name/${variant}_head/seed$seed"
    mini="$OUT/$name/${variant}_head_mini_batch/seed$seed"
    if [[ "${D2BN_STUDY_REUSE:-0}" == 1 && -f "$run/model_final.pth" ]]; then
      echo "[study] reusing $run"
    else
      echo "[study] $(date +%T) $name seed $seed: training ${variant}_head ($iters iterations, $ims image(s) per worker, 2 CPU processes)"
      rm -rf "$run" "$mini"
      mkdir -p "$run"
      "$PY" tools/train_net.py --num-gpus 2 --dist-url auto --config-file "$config" \
        "${DATA[@]}" "${TRAIN[@]}" OUTPUT_DIR "$run" > "$run/train_net.log" 2>&1 \
        || echo "[study] training failed: see $run/train_net.log"
    fi
    if [[ -f "$run/model_final.pth" && ! ( "${D2BN_STUDY_REUSE:-0}" == 1 && -f "$mini/log.txt" ) ]]; then
      echo "[study] $(date +%T) $name seed $seed: ${variant}_head with mini-batch statistics"
      rm -rf "$mini" && mkdir -p "$mini"
      "$PY" tools/train_net.py --num-gpus 2 --dist-url auto --eval-only --config-file "$config" \
        "${DATA[@]}" TEST.BN_STATS mini_batch TEST.IMS_PER_BATCH "$ims" \
        MODEL.WEIGHTS "$run/model_final.pth" OUTPUT_DIR "$mini" > "$mini/train_net.log" 2>&1 \
        || echo "[study] mini-batch evaluation failed: see $mini/train_net.log"
    fi
    if [[ -f "$run/model_final.pth" && ! ( "${D2BN_STUDY_REUSE:-0}" == 1 && -f "$run/leakage_probe.json" ) ]]; then
      echo "[study] $(date +%T) $name seed $seed: leakage probe of ${variant}_head"
      "$PY" "$HERE/leakage_probe.py" --num-gpus 2 --config-file "$config" --batches 20 \
        --out "$run/leakage_probe.json" "${DATA[@]}" "${TRAIN[@]}" MODEL.WEIGHTS "$run/model_final.pth" \
        > "$run/leakage_probe.log" 2>&1 || echo "[study] leakage probe failed: see $run/leakage_probe.log"
    fi
    if [[ $seed == "${SEEDS%% *}" ]]; then  # one entry per head: summarize.py reads its seed<S> runs
      RUN_DIRS+=("$name ${variant}_head=$OUT/$name/${variant}_head")
    fi
  done
done
done
"$PY" "$HERE/summarize.py" --out "${D2BN_STUDY_RESULTS:-$HERE/results}" --dataset "${DATASET}_val" "${RUN_DIRS[@]}"
