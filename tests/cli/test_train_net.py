"""tools/train_net.py: fails fast on bad input; trains and evaluates in 2 gloo processes."""
import json
import os
import pickle
import subprocess
import sys

import pytest

from scripts import REPO

TOY_RETINANET = os.path.join(REPO, "configs", "Toy", "retinanet_R18_FPN_bn_head.yaml")

from d2_batchnorm.cli import train_net  # noqa: E402


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config-file", "configs/nope.yaml"], "configs/nope.yaml' does not exist"),
        (["--config-file", TOY_RETINANET, "MODEL.NOT_A_KEY", "1"], "MODEL.NOT_A_KEY"),
        (["--config-file", TOY_RETINANET, "MODEL.RETINANET.NORM_STATS", "mine"], "MODEL.RETINANET.NORM_STATS"),
        (["--config-file", TOY_RETINANET, "DATASETS.TEST", "('no_such_set',)"], "'no_such_set' is not registered"),
        (["--config-file", TOY_RETINANET, "DATASETS.TRAIN", "('missing_files_train',)"], "does not exist"),
        (["--config-file", TOY_RETINANET, "--num-gpus", "0"], "--num-gpus = 0"),
        (["--config-file", TOY_RETINANET, "--num-gpus", "3", "SOLVER.IMS_PER_BATCH", "12", "BN.SYNC_GROUP_SIZE", "2"],
         "BN.SYNC_GROUP_SIZE"),
        (["--config-file", TOY_RETINANET, "--num-gpus", "3"],
         "SOLVER.IMS_PER_BATCH = 16 is not allowed with 3 workers"),
        (["--config-file", TOY_RETINANET, "SOLVER.MAX_ITER", "-5"], "SOLVER.MAX_ITER = -5"),
        (["--config-file", TOY_RETINANET, "--eval-only", "MODEL.WEIGHTS", "{tmp}/notes.txt"],
         "MODEL.WEIGHTS = '{tmp}/notes.txt' is not a readable checkpoint"),
        (["--config-file", TOY_RETINANET, "MODEL.WEIGHTS", "{tmp}/cut.pkl"],
         "MODEL.WEIGHTS = '{tmp}/cut.pkl' is not a readable checkpoint: a pickle cut short"),
        (["--config-file", TOY_RETINANET, "--eval-only", "MODEL.WEIGHTS", "{tmp}/nowhere.pth"],
         "MODEL.WEIGHTS = '{tmp}/nowhere.pth' does not exist"),
        (["--config-file", TOY_RETINANET, "--resume"],
         "the checkpoint named by {tmp}/out/last_checkpoint = '{tmp}/out/notes.txt' is not a readable"),
    ],
)
def test_bad_input_fails_before_any_worker_starts(argv, message, capsys, tmp_path):
    """One ``error:`` line naming the key or file; nothing is written into OUTPUT_DIR."""
    from detectron2.data.datasets import register_coco_instances

    if "missing_files_train" not in __import__("detectron2").data.DatasetCatalog.list():
        register_coco_instances("missing_files_train", {}, str(tmp_path / "none.json"), str(tmp_path))
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "cut.pkl").write_bytes(pickle.dumps({"model": list(range(100))})[:-20])
    out = tmp_path / "out"
    if "--resume" in argv:  # a previous run's last_checkpoint names a file that is not one
        out.mkdir()
        (out / "last_checkpoint").write_text("notes.txt")
        (out / "notes.txt").write_text("not a checkpoint\n")
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv] + ["OUTPUT_DIR", str(out)]
    assert train_net.cli(argv) == 2
    err = capsys.readouterr().err
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before


def test_checkpoint_check_accepts_what_detectron2_loads(tmp_path):
    import torch

    from d2_batchnorm.engine import check_checkpoint

    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "zip.pth")
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    (tmp_path / "weights.pkl").write_bytes(pickle.dumps({"model": {"w": [1.0, 2.0]}}, protocol=2))
    for name in ("zip.pth", "legacy.pth", "weights.pkl"):
        check_checkpoint(str(tmp_path / name))
    check_checkpoint("detectron2://ImageNetPretrained/MSRA/R-50.pkl")  # URLs: detectron2's
    check_checkpoint("")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "zip.pth").read_bytes()[:-100])
    with pytest.raises(ValueError, match="cut.pth' is not a readable checkpoint"):
        check_checkpoint(str(tmp_path / "cut.pth"))


def test_two_process_training_writes_metrics_with_bbox_ap(tmp_path):
    out = tmp_path / "run"
    common = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", TOY_RETINANET,
              "--num-gpus", "2"]
    opts = ["SOLVER.MAX_ITER", "6", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "2",
            "TEST.DETECTIONS_PER_IMAGE", "20", "OUTPUT_DIR", str(out)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(common + opts, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "log.txt.rank1").is_file(), "the second worker did not run"
    assert (out / "model_final.pth").is_file()
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert max(r["iteration"] for r in records) == 6
    assert any("bbox/AP" in r for r in records)

    # --eval-only on the checkpoint just written gives an AP again
    proc = subprocess.run(common + ["--eval-only"] + opts + ["MODEL.WEIGHTS", str(out / "model_final.pth"),
                          "OUTPUT_DIR", str(tmp_path / "eval")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "copypaste: AP,AP50" in proc.stdout + proc.stderr


def test_readme_own_trainer_snippet_works_without_cuda(tmp_path, monkeypatch):
    """docs/getting-started.md's "In your own trainer" snippet, as written, on a machine without CUDA."""
    import re

    import torch

    readme = open(os.path.join(REPO, "docs", "getting-started.md")).read()
    snippet = re.search(r"### In your own trainer\n```python\n(.*?)```", readme, re.S).group(1)
    assert 'merge_from_file("my.yaml")' in snippet and "BNTrainer(cfg)" in snippet
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)  # the config's relative OUTPUT_DIR lands here
    namespace = {}
    exec(snippet.replace("my.yaml", TOY_RETINANET), namespace)
    trainer = namespace["trainer"]
    assert trainer.cfg.MODEL.DEVICE == "cpu"
    assert all(p.device.type == "cpu" for p in trainer.model.parameters())
