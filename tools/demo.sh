#!/usr/bin/env bash
# The main job on the embedded default: generates the toy COCO-format dataset, trains a
# small RetinaNet with BatchNorm in its head in 2 CPU processes (gloo) through
# tools/train_net.py, evaluates it with detectron2's COCOEvaluator and prints the bbox AP
# table; then compares the leakage mitigations of R-CNN BN heads where BN leaks
# (tools/demo_compare.sh: toy_coco_relative, 1 image per worker).
#   bash tools/demo.sh
#   D2BN_DEMO_OUTPUT=dir          where runs are written (default: output/demo)
#   D2BN_COMPARE_ITERS=N          training iterations of each compared run (default: 2000)
#   D2BN_COMPARE_SEEDS=K|S1,...   seeds of the comparison (default: 2; 1 for a quicker look)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/bootstrap_env.sh
export PYTHONWARNINGS=ignore
out=${D2BN_DEMO_OUTPUT:-output/demo}
mkdir -p "$out"

echo "== 1/2: RetinaNet (R18-FPN, BN head) on the toy dataset, 2 CPU processes;"
echo "   evaluated with the EMA statistics (ema/bbox/AP) and with PreciseBN's (bbox/AP)"
"$D2BN_PYTHON" tools/train_net.py --num-gpus 2 \
  --config-file configs/Toy/retinanet_R18_FPN_bn_head.yaml \
  SOLVER.MAX_ITER 200 SOLVER.STEPS "(150, 180)" \
  TEST.PRECISE_BN.ENABLED True TEST.PRECISE_BN.NUM_SAMPLES 1024 \
  OUTPUT_DIR "$out/retinanet_bn_head" 2>&1 | tee "$out/retinanet_bn_head.log" \
  | { grep --line-buffered -E "eta:|copypaste|PreciseBN: [0-9]+ images|Traceback|error:|Error:" || true; }
"$D2BN_PYTHON" tools/compare.py --out "$out/retinanet_bn_head" \
  --title "Toy RetinaNet, BN head: EMA vs precise statistics" "retinanet_bn_head=$out/retinanet_bn_head"

if [ -f tools/demo_compare.sh ]; then
  echo "== 2/2: BN in R-CNN heads leaks with 1 image per worker; SyncBN and the RoI shuffle fix it (2 CPU processes)"
  bash tools/demo_compare.sh "$out/leakage"
fi
