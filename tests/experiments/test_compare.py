"""Tests of tools/compare.py on hand-made output directories (no training)."""
import csv
import json
import os
import time

import pytest

from d2_batchnorm import experiments
from d2_batchnorm.cli.compare import main as compare_main

CONFIG_YAML = """MODEL:
  MASK_ON: true
  ROI_BOX_HEAD: {{NORM: BN, LEAKAGE_MITIGATION: {mit}}}
  ROI_MASK_HEAD: {{NORM: BN, LEAKAGE_MITIGATION: {mit}}}
TEST:
  BN_STATS: {stats}
  IMS_PER_BATCH: 2
  PRECISE_BN: {{ENABLED: {precise}}}
"""


def _run_dir(root, name, mit="none", stats="population", precise="false", metrics=None, log=""):
    path = root / name
    path.mkdir()
    (path / "config.yaml").write_text(CONFIG_YAML.format(mit=mit, stats=stats, precise=precise))
    if metrics is not None:
        with open(path / "metrics.json", "w") as f:
            for record in metrics:
                f.write(json.dumps(record) + "\n")
    (path / "log.txt").write_text(log)
    return str(path)


COPYPASTE = """[d2.evaluation.testing]: copypaste: Task: bbox
[d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl
[d2.evaluation.testing]: copypaste: 41.2500,60.0,40.0,nan,41.0,50.0
[d2.evaluation.testing]: copypaste: Task: segm
[d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl
[d2.evaluation.testing]: copypaste: 38.5000,58.0,37.0,nan,38.0,45.0
"""


def test_reads_finished_failed_unfinished_missing_and_eval_only_runs(tmp_path):
    ok = _run_dir(tmp_path, "shuffle", mit="shuffle", precise="true", metrics=[
        {"iteration": 9, "total_loss": 1.0},
        {"iteration": 19, "ema/bbox/AP": 30.0, "ema/segm/AP": 28.0, "bbox/AP": 31.5, "segm/AP": 29.25},
    ])
    failed = _run_dir(tmp_path, "crashed", metrics=[{"iteration": 9, "total_loss": 1.0}],
                      log="Traceback (most recent call last):\n  File x\nRuntimeError: boom\n")
    unfinished = _run_dir(tmp_path, "running", metrics=[{"iteration": 9, "total_loss": 1.0}, ])
    eval_only = _run_dir(tmp_path, "batch_stats", stats="mini_batch", log=COPYPASTE)
    runs = [
        experiments.read_run(ok),
        experiments.read_run(failed),
        experiments.read_run(unfinished),
        experiments.read_run(eval_only, "bn head, batch stats"),
        experiments.read_run(str(tmp_path / "nowhere")),
    ]
    assert [r.status for r in runs] == ["ok", "failed", "unfinished", "ok", "missing"]
    assert runs[0].metrics == {"bbox/AP": 31.5, "segm/AP": 29.25, "ema/bbox/AP": 30.0, "ema/segm/AP": 28.0}
    assert runs[0].mitigation == "shuffle" and runs[0].statistics == "population (precise)"
    assert "RuntimeError: boom" in runs[1].detail
    assert runs[3].metrics == {"bbox/AP": 41.25, "segm/AP": 38.5}
    assert runs[3].statistics.startswith("mini-batch") and runs[3].mitigation.startswith("none")

    markdown = experiments.write_tables(runs, str(tmp_path))
    lines = markdown.strip().splitlines()
    assert len(lines) == 2 + len(runs), "every run is a row, failed ones included"
    assert "bbox AP (EMA stats)" in lines[0]
    assert "| 31.5 | 29.2 | 30.0 | 28.0 |" in lines[2]
    assert "failed: RuntimeError: boom" in lines[3] and "unfinished" in lines[4] and "missing" in lines[6]
    with open(tmp_path / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "failed", "unfinished", "ok", "missing"]
    assert float(rows[3]["segm/AP"]) == 38.5

    experiments.plot(runs, str(tmp_path / "compare.png"))
    assert (tmp_path / "compare.png").stat().st_size > 1000


def test_main_with_directories_and_a_failing_config(tmp_path, capsys):
    ok = _run_dir(tmp_path, "bn", metrics=[{"bbox/AP": 20.0, "segm/AP": 18.0}])
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text('_BASE_: "%s"\nMODEL:\n  ROI_BOX_HEAD:\n    LEAKAGE_MITIGATION: "shufle"\n'
                          % os.path.abspath("configs/Toy/mask_rcnn_R18_FPN_base.yaml"))
    out = tmp_path / "out"
    rc = compare_main([f"bn={ok}", str(bad_config), "--out", str(out), "--timeout", "300"])
    assert rc == 1
    printed = capsys.readouterr().out
    assert "| bn |" in printed and "failed" in printed
    log = (out / "runs" / "bad" / "train_net.log").read_text()
    assert "LEAKAGE_MITIGATION" in log
    assert (out / "compare.png").is_file() and (out / "compare.csv").is_file()


def test_main_lists_runs_with_corrupt_metrics_as_corrupt(tmp_path, capsys):
    ok = _run_dir(tmp_path, "ok", metrics=[{"bbox/AP": 20.0, "segm/AP": 18.0}])
    not_utf8 = _run_dir(tmp_path, "not_utf8", log=COPYPASTE)
    (tmp_path / "not_utf8" / "metrics.json").write_bytes(
        b'{"iteration": 9, "total_loss": 1.0}\n{"iteration": 19, "note": "\xff\xfe"}\n')
    garbage = _run_dir(tmp_path, "garbage")
    (tmp_path / "garbage" / "metrics.json").write_text(
        '{"iteration": 9, "total_loss": 1.0}\nnot json at all\n{"bbox/AP": 21.0, "segm/AP": 19.0}\n')
    out = tmp_path / "cmp"
    assert compare_main([ok, not_utf8, garbage, "--out", str(out)]) == 1
    assert "corrupt" in capsys.readouterr().out
    md_rows = (out / "compare.md").read_text().strip().splitlines()[2:]
    assert len(md_rows) == 3 and "corrupt: " in md_rows[1] and "corrupt: " in md_rows[2]
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "corrupt", "corrupt"]
    assert float(rows[0]["bbox/AP"]) == 20.0
    assert rows[1]["detail"] == os.path.join(not_utf8, "metrics.json") + ": line 2 is not valid UTF-8"
    assert rows[2]["detail"] == os.path.join(garbage, "metrics.json") + ": line 2 is not a JSON object"
    assert rows[1]["bbox/AP"] == rows[2]["bbox/AP"] == "", "no AP from a corrupt run"
    assert (out / "compare.png").is_file()


@pytest.mark.parametrize(
    "tail, status",
    [
        ('{"iteration": 29, "bbox/A', "ok"),  # cut short by a killed run, no newline: tolerated
        ('{"iteration": 29, "bbox/A\n', "corrupt"),  # a complete line that is not JSON
        ("[29, 30.0]\n", "corrupt"),  # JSON, but not an object
    ],
)
def test_last_line_of_metrics(tmp_path, tail, status):
    path = _run_dir(tmp_path, "run", metrics=[{"iteration": 19, "bbox/AP": 31.5, "segm/AP": 29.25}])
    with open(tmp_path / "run" / "metrics.json", "a") as f:
        f.write(tail)
    run = experiments.read_run(path)
    assert run.status == status
    if status == "ok":
        assert run.metrics == {"bbox/AP": 31.5, "segm/AP": 29.25}
    else:
        assert run.detail == os.path.join(path, "metrics.json") + ": line 2 is not a JSON object"


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"MODEL:\n  MASK_ON: [true\n", "is not valid YAML"),
        (b"MODEL:\n  NAME: \xff\xfe\n", "not valid UTF-8"),
        (b"- MODEL\n- TEST\n", "not a YAML mapping"),
    ],
)
def test_corrupt_config_yaml(tmp_path, content, reason):
    path = _run_dir(tmp_path, "run", metrics=[{"bbox/AP": 20.0, "segm/AP": 18.0}])
    (tmp_path / "run" / "config.yaml").write_bytes(content)
    run = experiments.read_run(path)
    assert run.status == "corrupt"
    assert run.detail.startswith(os.path.join(path, "config.yaml") + ": ") and reason in run.detail
    assert experiments.status_text(run).startswith("corrupt: ")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["a=x", "a=y"], "unique"),
        (["missing.yaml"], "does not exist"),
        (["x", "--num-gpus", "0"], "--num-gpus"),
        (["x", "--", "SOLVER.MAX_ITER"], "KEY VALUE"),
    ],
)
def test_bad_arguments(tmp_path, capsys, argv, message):
    assert compare_main(argv + ["--out", str(tmp_path)] if "--" not in argv else
                        argv[:argv.index("--")] + ["--out", str(tmp_path)] + argv[argv.index("--"):]) == 2
    assert message in capsys.readouterr().err


def _seed_runs(root, label, aps, mit="none"):
    """OUT/runs/<label>/seed<s> directories as compare.py --seeds writes them."""
    (root / label).mkdir(parents=True)
    for seed, ap in aps.items():
        _run_dir(root / label, f"seed{seed}", mit=mit,
                 metrics=None if ap is None else [{"bbox/AP": ap, "segm/AP": ap - 2}])
    return str(root / label)


def test_seeds_give_mean_sd_per_variant_and_paired_differences(tmp_path):
    bn = _seed_runs(tmp_path, "bn", {1: 50.0, 2: 54.0, 3: 52.0})
    shuffle = _seed_runs(tmp_path, "shuffle", {1: 53.0, 2: 55.0, 3: None}, mit="shuffle")
    runs = experiments.read_dir(bn, "bn") + experiments.read_dir(shuffle, "shuffle")
    assert [(r.label, r.seed, r.status) for r in runs] == [
        ("bn", 1, "ok"), ("bn", 2, "ok"), ("bn", 3, "ok"),
        ("shuffle", 1, "ok"), ("shuffle", 2, "ok"), ("shuffle", 3, "unfinished")]
    # paired by seed, only where both runs are ok: 53-50, 55-54
    assert experiments.paired_differences(runs, "bn", "bbox/AP") == {"shuffle": [3.0, 1.0]}
    markdown = experiments.write_seed_tables(runs, str(tmp_path), baseline="bn")
    header, _, bn_row, shuffle_row = markdown.strip().splitlines()
    assert "bbox AP (mean ± sd)" in header and "Δ bbox AP vs bn (paired, mean ± sd)" in header
    assert "| 3/3 | 52.0 ± 2.0 | 50.0 ± 2.0 | 1: 50.0, 2: 54.0, 3: 52.0 | (baseline) |" in bn_row
    assert "| 2/3 | 54.0 ± 1.4 |" in shuffle_row and "| 2.0 ± 1.4 |" in shuffle_row
    assert "seed 3 unfinished" in shuffle_row
    assert experiments.paired_summary(runs, "bn") == \
        "Δ bbox AP vs bn, paired per seed: shuffle +2.0 ± 1.4 (2 seeds, beyond its spread)"
    with open(tmp_path / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["seed"], r["status"]) for r in rows] == [
        (r.label, str(r.seed), r.status) for r in runs]
    experiments.plot(runs, str(tmp_path / "compare.png"))
    assert (tmp_path / "compare.png").stat().st_size > 1000


@pytest.mark.parametrize("differences, reading", [
    ([3.0, 1.0], "beyond its spread"),  # same sign, |mean| 2 > sd 1.41
    ([3.0, -1.0], "within its spread"),  # signs differ
    ([4.0, 0.5, 0.5], "within its spread"),  # same sign, |mean| 1.67 < sd 2.02
    ([-2.0, -2.5], "beyond its spread"),
    ([5.0], "one seed, no spread"),
    ([], "no paired seeds"),
])
def test_beyond_spread(differences, reading):
    assert experiments.beyond_spread(differences) == reading


def test_seeds_reuse_finished_runs_and_rerun_the_rest(tmp_path, capsys):
    config = tmp_path / "bad.yaml"  # fails in train_net's launch-time checks: a cheap "run"
    config.write_text('_BASE_: "%s"\nMODEL:\n  ROI_BOX_HEAD:\n    LEAKAGE_MITIGATION: "shufle"\n'
                      % os.path.abspath("configs/Toy/mask_rcnn_R18_FPN_base.yaml"))
    out = tmp_path / "out"
    runs = out / "runs" / "bad"
    runs.mkdir(parents=True)
    done = _run_dir(runs, "seed1", metrics=[{"bbox/AP": 40.0, "segm/AP": 38.0}])
    request = {"config": str(config), "opts": ["SOLVER.MAX_ITER", "5", "SEED", "1"], "workers": 2}
    with open(os.path.join(done, experiments.REQUEST_FILE), "w") as f:
        json.dump({"request": request, "seconds": 12.0}, f)
    stale = _run_dir(runs, "seed2", metrics=[{"bbox/AP": 41.0}])  # made by another request
    argv = [f"bad={config}", "--seeds", "2", "--out", str(out), "--", "SOLVER.MAX_ITER", "5"]
    assert compare_main(argv) == 1
    printed = capsys.readouterr().out
    assert "bad seed 1: reusing the finished run" in printed
    assert "is made by another request; running it again" in printed
    assert "SEED 2" in (runs / "seed2" / "train_net.log").read_text()
    assert not os.path.exists(os.path.join(stale, "metrics.json"))  # the stale run was removed
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["seed"], r["status"]) for r in rows] == [("1", "ok"), ("2", "failed")]
    assert rows[0]["seconds"] == "12.0"
    assert float(rows[1]["seconds"]) > 0.5  # the time the local launcher took to run it


def test_local_runs_each_count_their_own_seconds(tmp_path):
    config = tmp_path / "bad.yaml"  # fails in train_net's launch-time checks: a cheap "run"
    base = os.path.abspath("configs/Toy/mask_rcnn_R18_FPN_base.yaml")
    config.write_text('_BASE_: "%s"\nBN:\n  MOMENTUM: 2.0\n' % base)
    start = time.perf_counter()
    compare_main([f"bad={config}", "--seeds", "2", "--out", str(tmp_path / "out")])
    elapsed = time.perf_counter() - start
    with open(tmp_path / "out" / "compare.csv") as f:
        seconds = [float(r["seconds"]) for r in csv.DictReader(f)]
    # run 1 ended before run 2 started: counting until its finish line would include run 2
    assert len(seconds) == 2 and all(s > 0.5 for s in seconds) and sum(seconds) < elapsed


@pytest.mark.parametrize("seeds, expected", [("3", [1, 2, 3]), ("7,0,11", [7, 0, 11]), ("", [])])
def test_parse_seeds(seeds, expected):
    assert experiments.parse_seeds(seeds) == expected


@pytest.mark.parametrize("seeds", ["0", "two", "1,1", "-1,2"])
def test_bad_seeds(tmp_path, capsys, seeds):
    assert compare_main(["x", f"--seeds={seeds}", "--out", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_training_progress_reads_the_last_eta_line_of_log_txt(tmp_path):
    assert experiments.training_progress(str(tmp_path)) is None
    (tmp_path / "log.txt").write_text(
        "[12/03 12:00:01 d2.utils.events]:  eta: 0:04:10  iter: 19  total_loss: 2.1\n"
        "[12/03 12:00:09 d2.utils.events]:  eta: 0:03:21  iter: 39  total_loss: 1.7\n"
    )
    assert experiments.training_progress(str(tmp_path)) == (40, "0:03:21")
