"""projects/PreciseBN/run_study.py's report over momenta and seeds, on synthetic runs."""
import csv
import json
import os

import torch

from scripts import load_script


def _study_module():
    return load_script("projects/PreciseBN/run_study.py", "precise_bn_study")


def _copypaste(ap: float) -> str:
    return ("[d2.evaluation.testing]: copypaste: Task: bbox\n"
            "[d2.evaluation.testing]: copypaste: AP,AP50\n"
            f"[d2.evaluation.testing]: copypaste: {ap},60.0\n")


def _write_run(path, aps, weights=None):
    """aps: the box AP of each evaluation point, in order; weights: a final checkpoint's model."""
    os.makedirs(path)
    with open(os.path.join(path, "log.txt"), "w") as f:
        f.write("".join(_copypaste(ap) for ap in aps))
    if weights is not None:
        torch.save({"model": weights}, os.path.join(path, "model_final.pth"))


def test_ema_runs_are_paired_per_seed_with_the_precise_run(tmp_path):
    study = _study_module()
    assert study.evaluation_points() == [20, 40, 60, 80]
    precise = {1: [1.0, 8.0, 17.0, 21.0], 2: [2.0, 10.0, 19.0, 22.0]}
    ema = {("ema_m0.1", 1): [0.0, 2.0, 16.0, 21.0], ("ema_m0.1", 2): [0.0, 6.0, 17.0, 22.5],
           ("ema_m0.01", 1): [0.0, 0.0, 1.0, 3.0], ("ema_m0.01", 2): [0.0, 0.0, 2.0, 5.0],
           ("ema_m0.3", 1): [0.5, 7.0]}  # stopped after 40 iterations
    same = {"conv.weight": torch.ones(2), "bn.running_mean": torch.zeros(2)}
    for seed, aps in precise.items():
        _write_run(study.run_dir(str(tmp_path), "precise", seed), aps, weights=same if seed == 1 else None)
    for (name, seed), aps in ema.items():
        _write_run(study.run_dir(str(tmp_path), name, seed), aps,
                   weights={**same, "bn.running_mean": torch.ones(2)} if seed == 1 else None)

    runs = study.collect(str(tmp_path), [1, 2])
    diffs = {seed: study.weight_difference(str(tmp_path), seed) for seed in (1, 2)}
    assert diffs == {1: 0.0, 2: None}  # BN statistics differ, weights do not; seed 2 has no checkpoints
    table = study.report(runs, diffs)
    # m = 0.1 at 40 iterations: EMA 2, 6; precise 8, 10; gains +6, +4 (paired per seed)
    assert "| 0.1 | 40 | 640 | 2 | 4.00 ± 2.83 | 9.00 ± 1.41 | +5.00 ± 1.41 | 2/2 |" in table
    assert "| 0.01 | 80 | 1280 | 2 | 4.00 ± 1.41 | 21.50 ± 0.71 | +17.50 ± 0.71 | 2/2 |" in table
    assert "| 0.3 | 40 | 640 | 1 | 7.00 | 8.00 | +1.00 | 1/1 |" in table and "| 0.3 | 60 |" not in table
    assert "(seeds [1]): largest |difference| 0 " in table

    other = tmp_path / "other"
    for name in study.RUNS:
        weights = {"conv.weight": torch.ones(2) * (1.5 if name == "ema_m0.01" else 1.0)}
        _write_run(study.run_dir(str(other), name, 1), [1.0], weights=weights)
    assert study.weight_difference(str(other), 1) == 0.5

    study.write_csv(runs, str(tmp_path / "results.csv"))
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 4 + 2
    assert ("0.1", "2", "40", "4.0") in {(r["ema_momentum"], r["seed"], r["iteration"], r["gain"]) for r in rows}
    study.plot(runs, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_consistency_tools_report_paired_differences(tmp_path):
    study = _study_module()
    runs = {"precise": {}}
    for seed, (pop, mini, before, after) in {1: (20.0, 18.0, 0.1, 12.0), 2: (22.0, 21.0, 0.3, 14.0)}.items():
        runs["precise"][seed] = {80: pop}
        dirs = study.consistency_dirs(str(tmp_path), seed)
        os.makedirs(dirs["mini_batch"])
        with open(os.path.join(dirs["mini_batch"], "log.txt"), "w") as f:
            f.write(_copypaste(mini))
        os.makedirs(dirs["new_domain"])
        with open(os.path.join(dirs["new_domain"], "model_precise_bn.json"), "w") as f:
            json.dump({"before": {"bbox": {"AP": before}}, "after": {"bbox": {"AP": after}}}, f)
    table = study.consistency_report(str(tmp_path), runs, [1, 2])
    assert "| 19.50 ± 2.12 (2) | -1.50 ± 0.71 |" in table  # mini-batch statistics, paired to precise
    assert "| 13.00 ± 1.41 (2) | +12.80 ± 1.27 |" in table  # new domain: gains 11.9, 13.7
