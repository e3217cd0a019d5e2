"""projects/LeakageStudy/summarize.py over seeds: mean ± sd and gaps paired per seed."""
import csv
import json
import os

from scripts import load_script

COPYPASTE = """[d2.evaluation.testing]: copypaste: Task: bbox
[d2.evaluation.testing]: copypaste: AP,AP50
[d2.evaluation.testing]: copypaste: {bbox},60.0
[d2.evaluation.testing]: copypaste: Task: segm
[d2.evaluation.testing]: copypaste: AP,AP50
[d2.evaluation.testing]: copypaste: {segm},58.0
"""


def _summarize_module():
    return load_script("projects/LeakageStudy/summarize.py")


def test_heads_over_seeds(tmp_path):
    # seed -> (population bbox AP, mini-batch bbox AP, probe fg accuracy with population stats)
    seeds = {2: (70.0, 88.0, 0.70), 3: (74.0, 89.0, 0.80), 4: (72.0, None, 0.75)}
    head = tmp_path / "bn_head"
    for seed, (pop, mini, probe) in seeds.items():
        run = head / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text("MODEL:\n  MASK_ON: true\n  ROI_BOX_HEAD: {NORM: BN}\n")
        (run / "metrics.json").write_text(json.dumps({"bbox/AP": pop, "segm/AP": pop - 2}) + "\n")
        (run / "leakage_probe.json").write_text(json.dumps({
            "batch": {"loss_cls": 0.1, "fast_rcnn/fg_cls_accuracy": 0.9},
            "population": {"loss_cls": 0.2, "fast_rcnn/fg_cls_accuracy": probe}}))
        if mini is not None:
            eval_only = tmp_path / "bn_head_mini_batch" / f"seed{seed}"
            eval_only.mkdir(parents=True)
            (eval_only / "log.txt").write_text(COPYPASTE.format(bbox=mini, segm=mini - 3))
    markdown = _summarize_module().summarize([f"bn={head}"], str(tmp_path / "out"), "toy_val")
    row = next(line for line in markdown.splitlines() if line.startswith("| bn |"))
    # population over 3 seeds; mini-batch and the paired gap (18, 15) over the 2 evaluated ones
    assert "| 2, 3, 4 | 72.0 ± 2.0 (3) | 88.5 ± 0.7 (2) | +16.5 ± 2.1 (2) |" in row
    assert "2: +18.0, 3: +15.0, 4: —" in row and "seed 4 mini-batch: missing" in row
    assert "| -0.150 ± 0.050 (3) |" in markdown  # probe fg accuracy gap, pop - batch
    with open(tmp_path / "out" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["seed"], r["bbox/AP gap"]) for r in rows] == [("2", "18.0"), ("3", "15.0"), ("4", "")]
    assert (tmp_path / "out" / "results.png").stat().st_size > 1000
