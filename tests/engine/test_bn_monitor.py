"""
BNMonitor: its scalars against independent computations (batch vs running statistics,
the leakage gap, divergence across 2 gloo ranks), one warning per problem naming the group
and the config line, and no trace in the training it observes. The yacs kind in 2 gloo
processes on a detection model is in test_reproducibility.py; the LazyConfig kind here.
"""
import copy
import logging
import os
from types import SimpleNamespace

import pytest
import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils.events import EventStorage
from torch import nn
from tiny_datasets import TINY_VAL, register_tiny_val, write_tiny_val

from d2_batchnorm.config_kinds import LazyConfig, YacsConfig
from d2_batchnorm.engine.bn_monitor import BNMonitor, leakage_losses
from d2_batchnorm.layers import SyncBatchNorm
from scripts import REPO


class _Net(nn.Module):
    """``backbone`` (conv, nn.BatchNorm2d), ``head`` (conv, SyncBatchNorm); a loss that
    depends on which statistics BN uses."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4))
        self.head = nn.Sequential(nn.Conv2d(4, 3, 1), SyncBatchNorm(3))

    def forward(self, x):
        y = self.head(torch.relu(self.backbone(x)))
        return {"loss_a": (y - 1).square().mean(), "loss_b": y.abs().mean() * 0.1}


def _batches(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 2, 4, 4, generator=g) * (1 + i) + i for i in range(n)]


def _train(model, batches, hooks):
    trainer = SimpleTrainer(model, batches, torch.optim.SGD(model.parameters(), lr=0.05))
    trainer.register_hooks(hooks)
    trainer.train(0, len(batches))
    return trainer


def _shift_and_ratio(x, mean_r, var_r, eps):
    """The monitor's distances by hand, in float64: x (N, C, H, W) against running (C,)."""
    x = x.double()
    m = x.mean((0, 2, 3))
    v = x.var((0, 2, 3), unbiased=False)
    mean_r, var_r = mean_r.double(), var_r.double()
    return float(((m - mean_r).abs() / (var_r + eps).sqrt()).mean()), float(((v + eps) / (var_r + eps)).log().abs().mean())


def _gap_by_hand(model, batch):
    batch_mode, pop = copy.deepcopy(model).train(), copy.deepcopy(model).eval()
    with torch.no_grad():
        a, b = batch_mode(batch), pop(batch)
    return {k: float(b[k] - a[k]) for k in a}, sum(float(v) for v in a.values())


def test_monitor_scalars_against_independent_computations_and_no_trace():
    torch.manual_seed(0)
    model = _Net()
    reference = copy.deepcopy(model)
    data, fixed = _batches(1), _batches(2, 1)[0]
    monitor = BNMonitor(period=2, model=model, data_loader=[fixed], seed=5)
    trainer = _train(model, data, [monitor])
    # the reference: the same training without the monitor, stopped before the monitored steps
    before = copy.deepcopy(reference)
    _train(before, data[:3], [])
    _train(reference, data, [])
    for (k, p), q in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(p, q), f"the monitor changed {k}"
    scalars = trainer.storage.latest()
    assert scalars["bn_monitor/nonfinite/backbone"][1] == 3  # monitored at iterations 1 and 3
    # step 3's batch statistics against the running statistics before step 3
    bn_in = before.backbone[0](data[3]).detach()
    shift, ratio = _shift_and_ratio(bn_in, before.backbone[1].running_mean, before.backbone[1].running_var, 1e-5)
    assert scalars["bn_monitor/batch_mean_shift/backbone"][0] == pytest.approx(shift, rel=1e-5)
    assert scalars["bn_monitor/batch_var_ratio/backbone"][0] == pytest.approx(ratio, rel=1e-5)
    gaps, batch_total = _gap_by_hand(reference, fixed)
    for k, v in gaps.items():
        assert scalars[f"bn_monitor/leakage_gap/{k}"][0] == pytest.approx(v, rel=1e-5, abs=1e-7)
    assert scalars["bn_monitor/leakage_gap/total_loss"][0] == pytest.approx(sum(gaps.values()), rel=1e-5)
    assert scalars["bn_monitor/gap_batch_loss/total_loss"][0] == pytest.approx(batch_total, rel=1e-5)
    for q in ("nonfinite", "skipped_batches", "rank_divergence", "collapsed_var", "collapsed_gamma"):
        assert scalars[f"bn_monitor/{q}/head"][0] == 0, q


def test_leakage_losses_restore_buffers_and_random_state():
    torch.manual_seed(0)
    model = _Net().train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    out = leakage_losses(model, _batches(3, 1)[0], seed=9)
    assert torch.equal(state, torch.get_rng_state())
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), k
    gaps, _ = _gap_by_hand(model, _batches(3, 1)[0])
    assert out["population"]["loss_a"] - out["batch"]["loss_a"] == pytest.approx(gaps["loss_a"], rel=1e-5)
    assert out["batch"]["total_loss"] == pytest.approx(out["batch"]["loss_a"] + out["batch"]["loss_b"])


@pytest.mark.parametrize("kind", [YacsConfig, LazyConfig])
def test_each_problem_is_one_warning_naming_group_and_config_line(caplog, kind):
    torch.manual_seed(0)
    model = _Net().train()
    guard = SimpleNamespace(restored_steps=torch.tensor(2))
    monitor = BNMonitor(period=1, model=model, seed=1, guard=guard, fix=kind.fix)
    model.backbone[1].running_var[0] = float("nan")
    model.head[1].weight.data[:2] = 0.0
    model.head[1].num_nonfinite_batches.fill_(4)
    with caplog.at_level(logging.WARNING, logger="d2_batchnorm.engine.bn_monitor"):
        for _ in range(3):
            scalars = monitor.measure()
    assert scalars["bn_monitor/nonfinite/backbone"] == 1 and scalars["bn_monitor/nonfinite/head"] == 0
    assert scalars["bn_monitor/collapsed_gamma/head"] == pytest.approx(2 / 3)
    assert scalars["bn_monitor/skipped_batches/head"] == 4
    assert scalars["bn_monitor/restored_steps/<model>"] == 2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines  # non-finite, collapsed gamma, skipped batches, restored steps: once each
    nonfinite = next(line for line in lines if "non-finite running" in line)
    assert "backbone" in nonfinite and kind.fix(("BN.GUARD_NONFINITE", True)) in nonfinite
    collapsed = next(line for line in lines if "gamma" in line)
    assert "head" in collapsed and kind.fix(("MODEL.RETINANET.NORM", "GN")) in collapsed
    assert kind.fix(("BN.GUARD_NONFINITE", True)) == ("BN.GUARD_NONFINITE True" if kind is YacsConfig
                                                      else "train.bn_guard_nonfinite=True")


@pytest.mark.parametrize("per_worker,precise,warns", [(True, False, True), (False, False, False), (True, True, False)])
def test_rank_divergence_warns_only_where_evaluation_reads_one_rank_s_statistics(caplog, per_worker, precise, warns):
    monitor = BNMonitor(period=1, model=_Net().train(), ema_per_worker=per_worker, precise_bn=precise)
    with caplog.at_level(logging.WARNING, logger="d2_batchnorm.engine.bn_monitor"):
        monitor._warn({"bn_monitor/rank_divergence/backbone": 0.5})
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == warns, lines
    if warns:
        assert "backbone" in lines[0] and "BN.EMA_ACROSS_WORKERS average" in lines[0]


def _two_ranks():
    """In each of 2 workers: one monitored step of _Net on the rank's own data."""
    from detectron2.utils import comm

    rank = comm.get_rank()
    torch.manual_seed(0)
    model = _Net().train()
    x = _batches(10 + rank, 1)[0]
    fixed = _batches(20 + rank, 1)[0]
    monitor = BNMonitor(period=1, model=model, data_loader=[fixed], seed=3)
    monitor.trainer = SimpleNamespace(iter=0, storage=EventStorage())
    running = [(m.running_mean.clone(), m.running_var.clone()) for m in (model.backbone[1], model.head[1])]
    monitor.before_step()
    head_in = torch.relu(model.backbone(x)).detach()
    head_in = model.head[0](head_in).detach()
    model(x)
    scalars = monitor.measure()
    buffers = [(m.running_mean.clone(), m.running_var.clone()) for m in (model.backbone[1], model.head[1])]
    gaps, _ = _gap_by_hand(model, fixed)  # SyncBatchNorm in training mode: both ranks call it together
    return scalars, buffers, running, head_in, gaps


def test_monitor_in_two_gloo_processes(run_workers):
    ranks = run_workers(_two_ranks)
    (s0, b0, running, in0, g0), (s1, b1, _, in1, g1) = ranks
    assert s0 == s1, "every scalar is reduced over the ranks"
    # divergence of the per-worker backbone BN by hand; the synchronized head's buffers agree
    (m0, v0), (m1, v1) = b0[0], b1[0]
    hi_v = torch.maximum(v0, v1).double()
    div = torch.maximum((m0 - m1).abs().double() / (hi_v + 1e-5).sqrt(), (v0 - v1).abs().double() / (hi_v + 1e-5))
    assert s0["bn_monitor/rank_divergence/backbone"] == pytest.approx(float(div.max()), rel=1e-6)
    assert torch.equal(b0[1][0], b1[1][0]) and s0["bn_monitor/rank_divergence/head"] == 0
    # the synchronized head's batch statistics are those of both ranks' inputs together
    shift, ratio = _shift_and_ratio(torch.cat([in0, in1]), *running[1], 1e-5)
    assert s0["bn_monitor/batch_mean_shift/head"] == pytest.approx(shift, rel=1e-5)
    assert s0["bn_monitor/batch_var_ratio/head"] == pytest.approx(ratio, rel=1e-5)
    assert s0["bn_monitor/leakage_gap/total_loss"] == pytest.approx(
        (sum(g0.values()) + sum(g1.values())) / 2, rel=1e-5)


def _lazy_monitor(output_dir, tiny_val):
    """A LazyConfig toy Mask R-CNN (shuffle heads) trained 2 iterations with the monitor at period 1."""
    import argparse

    from d2_batchnorm.engine import build_lazy_trainer, setup_lazy
    from d2_batchnorm.engine.bn_guard import NonFiniteGuard

    register_tiny_val(*tiny_val)
    opts = [
        "dataloader.train.dataset.names=toy_coco_train", f"dataloader.test.dataset.names={TINY_VAL}",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[64]",
        "dataloader.train.mapper.augmentations.0.max_size=64", "dataloader.train.total_batch_size=2",
        "train.max_iter=2", "train.eval_period=0", "train.bn_monitor.enabled=True", "train.bn_monitor.period=1",
        f"train.output_dir={output_dir}",
    ]
    config = os.path.join(REPO, "configs", "Toy", "mask_rcnn_R18_FPN_shuffle_head.py")
    cfg = setup_lazy(argparse.Namespace(config_file=config, opts=opts, eval_only=False, resume=False))
    trainer = build_lazy_trainer(cfg)
    kinds = [type(h).__name__ for h in trainer._hooks]
    trainer.train(0, 2)
    monitor = next(h for h in trainer._hooks if isinstance(h, BNMonitor))
    return kinds, monitor.last, isinstance(trainer._hooks[kinds.index("NonFiniteGuard")], NonFiniteGuard)


def test_monitor_with_a_lazy_config_in_two_gloo_processes(run_workers, tmp_path):
    from d2_batchnorm.data import prepare_datasets

    prepare_datasets(["toy_coco_train"])
    json_file = str(tmp_path / "tiny_val.json")
    (kinds, last, _), (_, last1, _) = run_workers(_lazy_monitor, str(tmp_path / "run"),
                                                  (json_file, write_tiny_val(json_file)))
    assert (kinds.index("NonFiniteGuard") < kinds.index("AverageBNStatistics") < kinds.index("BNMonitor")
            < kinds.index("PeriodicCheckpointer"))  # BN.EMA_ACROSS_WORKERS average, the default
    assert last == last1
    for key in ("bn_monitor/leakage_gap/total_loss", "bn_monitor/rank_divergence/roi_heads.box_head",
                "bn_monitor/batch_mean_shift/roi_heads.mask_head", "bn_monitor/restored_steps/<model>"):
        assert key in last, sorted(last)
    assert last["bn_monitor/nonfinite/roi_heads.box_head"] == 0
