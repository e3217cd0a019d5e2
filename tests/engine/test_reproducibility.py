"""
Hooks do not perturb the training they observe: with a fixed SEED, a toy Mask R-CNN with
RoI-shuffle BN heads (random augmentation, RoI sampling and shuffle permutations: every
source of randomness a detection training has) trains bitwise identically with evaluation
at all switched on or off, with mini-batch-statistics evaluation, and with every observer
at once — PreciseBN (and its EMA evaluation), the BN monitor (its loader, gap forwards
and collectives) and running statistics kept per worker instead of averaged — in 2 gloo
processes (the non-finite guard, on by default, in all of them;
tests/engine/test_bn_guard.py checks it changes nothing in a finite training); FrozenBN
late changes nothing before it freezes. The observers share one run (a training any of
them perturbed would differ from "base" unless two perturbations cancelled bitwise), which
keeps the test at 5 trainings.
"""
import os

from tiny_datasets import TINY_VAL, register_tiny_val, write_tiny_val

from scripts import REPO

CONFIG = os.path.join(REPO, "configs", "Toy", "mask_rcnn_R18_FPN_shuffle_head.yaml")
MAX_ITER = 6
COMMON = [
    "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "()",
    "TEST.DETECTIONS_PER_IMAGE", "10", "TEST.PRECISE_BN.NUM_SAMPLES", "8",
    "TEST.PRECISE_BN.PERIOD", "3", "SEED", "7", "DATASETS.TEST", f"('{TINY_VAL}',)",
]
# label -> opts; "base" evaluates every 3 iterations with EMA statistics
VARIANTS = {
    "base": ["TEST.EVAL_PERIOD", "3"],
    "no_eval": ["TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()"],
    # PreciseBN with its EMA evaluation, the BN monitor, and running statistics kept per
    # worker ("base" averages them over the workers before each evaluation)
    "observers": ["TEST.EVAL_PERIOD", "3", "TEST.PRECISE_BN.ENABLED", "True", "BN.MONITOR.ENABLED", "True",
                  "BN.MONITOR.PERIOD", "2", "BN.EMA_ACROSS_WORKERS", "per_worker"],
    "mini_batch_eval": ["TEST.EVAL_PERIOD", "3", "TEST.BN_STATS", "mini_batch"],
    "frozen_bn_late": ["TEST.EVAL_PERIOD", "3", "TEST.PRECISE_BN.ENABLED", "True",
                       "BN.FROZEN_LAST_ITERS", "2"],
}
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _train_variants(output_root, tiny_val):
    """In each worker: trains every variant from the same seed; returns losses and weights."""
    import logging

    from detectron2.utils import comm

    from d2_batchnorm.engine import BNTrainer, load_config
    from d2_batchnorm.rng import RandomStream

    logging.getLogger("detectron2").setLevel(logging.WARNING)
    logging.getLogger("d2_batchnorm").setLevel(logging.WARNING)
    register_tiny_val(*tiny_val)
    out = {}
    for label, opts in VARIANTS.items():
        opts = COMMON + opts + ["OUTPUT_DIR", os.path.join(output_root, label)]
        cfg = load_config(CONFIG, opts, comm.get_world_size())
        # as detectron2's default_setup: every source seeded from SEED + rank (a fresh
        # stream also restarts the RoI-shuffle counters, as in a new process)
        with RandomStream(cfg.SEED + comm.get_rank()):
            trainer = BNTrainer(cfg)
            trainer.resume_or_load(resume=False)
            trainer.train()
        history = trainer.storage.histories()
        losses = {
            name: [v for v, _ in h.values()] for name, h in history.items()
            if name.startswith("loss_") or name == "total_loss"
        }
        model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
        weights = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(BN_BUFFERS)}
        gap = "bn_monitor/leakage_gap/total_loss"
        out[label] = {"losses": losses, "weights": weights,
                      "precise_runs": [v for v, _ in history["precise_bn/samples"].values()]
                      if "precise_bn/samples" in history else [],
                      "monitor_runs": [it for _, it in history[gap].values()] if gap in history else [],
                      "scalars": sorted(history)}
    return out


def _assert_same_training(a, b, iters=None):
    """
    Bitwise equal losses (of the first ``iters`` iterations, default all; rank 0 logs
    them, averaged over the workers) and, for whole runs, weights.
    """
    assert a["losses"].keys() == b["losses"].keys()
    for name in a["losses"]:
        assert len(a["losses"][name]) == MAX_ITER
        assert a["losses"][name][:iters] == b["losses"][name][:iters], name
    if iters is None:
        for k in a["weights"]:
            assert a["weights"][k].equal(b["weights"][k]), k


def test_hooks_and_evaluation_do_not_perturb_training(run_workers, tmp_path):
    from d2_batchnorm.data import prepare_datasets

    prepare_datasets(["toy_coco_train"])
    json_file = str(tmp_path / "tiny_val.json")
    tiny_val = (json_file, write_tiny_val(json_file))
    ranks = run_workers(_train_variants, str(tmp_path), tiny_val)
    assert "total_loss" in ranks[0]["base"]["losses"] and not ranks[1]["base"]["losses"]
    for rank, runs in enumerate(ranks):
        base = runs["base"]
        assert runs["observers"]["precise_runs"] == [8.0, 8.0], "PreciseBN ran twice"
        assert rank == 1 or runs["observers"]["monitor_runs"] == [1, 3, 5], "the monitor ran every 2 iterations"
        assert rank == 1 or any(k.startswith("ema/") for k in runs["observers"]["scalars"]), "EMA evaluation ran"
        for label in ("no_eval", "observers", "mini_batch_eval"):
            _assert_same_training(base, runs[label])
        # FrozenBN from iteration 4 on: identical before (PreciseBN ran at 3 and right
        # before freezing), different after it — the comparison can see a difference
        frozen_from = MAX_ITER - 2
        _assert_same_training(base, runs["frozen_bn_late"], iters=frozen_from)
        assert rank == 1 or (
            base["losses"]["total_loss"][frozen_from:]
            != runs["frozen_bn_late"]["losses"]["total_loss"][frozen_from:]
        )
