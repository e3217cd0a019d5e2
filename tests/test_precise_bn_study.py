"""projects/PreciseBN/run_study.py's report over momenta and seeds, on synthetic runs."""
import csv
import json
import os

from scripts import load_script


def _study_module():
    return load_script("projects/PreciseBN/run_study.py", "precise_bn_study")


def _copypaste(ap: float) -> str:
    return ("[d2.evaluation.testing]: copypaste: Task: bbox\n"
            "[d2.evaluation.testing]: copypaste: AP,AP50\n"
            f"[d2.evaluation.testing]: copypaste: {ap},60.0\n")


def _write_run(path, aps, distances=None):
    """aps: [(EMA AP, precise AP)] per evaluation point, in order (log.txt prints EMA first)."""
    os.makedirs(path)
    with open(os.path.join(path, "log.txt"), "w") as f:
        f.write("".join(_copypaste(ema) + _copypaste(precise) for ema, precise in aps))
    with open(os.path.join(path, "metrics.json"), "w") as f:
        for done, (mean, var) in (distances or {}).items():
            f.write(json.dumps({"iteration": done - 1, "precise_bn/ema_mean_rel_dist": mean,
                                "precise_bn/ema_var_rel_dist": var}) + "\n")


def test_gain_is_paired_per_seed_and_precise_ap_is_checked_across_momenta(tmp_path):
    study = _study_module()
    points = study.evaluation_points()
    assert points == [20, 40, 60, 80]
    precise = {1: [1.0, 8.0, 17.0, 21.0], 2: [2.0, 10.0, 19.0, 22.0]}
    ema = {("m0.1", 1): [0.0, 2.0, 16.0, 21.0], ("m0.1", 2): [0.0, 6.0, 17.0, 22.5],
           ("m0.01", 1): [0.0, 0.0, 1.0, 3.0], ("m0.01", 2): [0.0, 0.0, 2.0, 5.0]}
    for (name, seed), values in ema.items():
        _write_run(study.run_dir(str(tmp_path), name, seed), list(zip(values, precise[seed])),
                   distances={40: (0.2, 0.3)} if seed == 1 else {40: (0.4, 0.5)})
    _write_run(study.run_dir(str(tmp_path), "m0.3", 1), [(0.5, 1.0), (7.0, 8.0)])  # stopped after 40

    runs = study.collect(str(tmp_path), ["m0.1", "m0.01", "m0.3"], [1, 2])
    table = study.report(runs)
    # m0.1 at 40 iterations: EMA 2, 6; precise 8, 10; gains +6, +4 (paired per seed)
    assert "| 0.1 | 40 | 640 | 2 | 4.00 ± 2.83 | 9.00 ± 1.41 | +5.00 ± 1.41 | 2/2 | 0.300 ± 0.141 / 0.400 ± 0.141 |" in table
    assert "| 0.01 | 80 | 1280 | 2 | 4.00 ± 1.41 | 21.50 ± 0.71 | +17.50 ± 0.71 | 2/2 | – / – |" in table
    assert "| 0.3 | 40 | 640 | 1 |" in table and "| 0.3 | 60 |" not in table
    assert "within a seed and point: 0.0000" in table

    _write_run(study.run_dir(str(tmp_path / "b"), "m0.1", 1), [(0.0, 1.0)])
    _write_run(study.run_dir(str(tmp_path / "b"), "m0.01", 1), [(0.0, 1.5)])  # other weights?
    spread = study.precise_ap_spread_within_seeds(study.collect(str(tmp_path / "b"), ["m0.1", "m0.01"], [1]))
    assert spread == 0.5

    study.write_csv(runs, str(tmp_path / "results.csv"))
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 4 + 2
    assert {(r["run"], r["seed"], r["iteration"], r["gain"]) for r in rows} >= {("m0.1", "2", "40", "4.0")}
    study.plot(runs, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_consistency_tools_report_paired_differences(tmp_path):
    study = _study_module()
    runs = {"m0.1": {}}
    for seed, (pop, mini, before, after) in {1: (20.0, 18.0, 0.1, 12.0), 2: (22.0, 21.0, 0.3, 14.0)}.items():
        runs["m0.1"][seed] = {80: {"ema": pop, "precise": pop}}
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
