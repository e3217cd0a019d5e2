"""
d2_batchnorm.engine.hooks: PreciseBN with EMA-vs-precise evaluation, FrozenBN late in
training, inference with mini-batch statistics, and BNTrainer's hook order.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from detectron2.utils.events import EventStorage
from torch import nn

from d2_batchnorm.bn_modes import average_running_statistics, force_bn_mode, mini_batch_statistics
from d2_batchnorm.engine.hooks import AverageBNStatistics, FrozenBNLate, PreciseBN
from d2_batchnorm.module_state import bn_statistics_distance, snapshot_bn_statistics


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


class _SyncFlagBN(nn.BatchNorm2d):
    """Stands in for a synchronized norm: records ``sync_stats`` at each call."""

    def __init__(self, c):
        super().__init__(c)
        self.sync_stats = True
        self.seen = []

    def forward(self, x):
        self.seen.append(self.sync_stats)
        return super().forward(x)


class _FakeTrainer:
    def __init__(self, max_iter):
        self.iter, self.max_iter = 0, max_iter
        self.storage = EventStorage()


def _data(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 5, 5, generator=g) * 2 + 1 for _ in range(n)]


def _exact_bn_inputs(net, data):
    with torch.no_grad():
        x = torch.cat([net.conv(d) for d in data]).double()
    return x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)


def test_precise_bn_hook_periodic_and_final_with_ema_eval():
    net = _Net()
    data = _data(1, 12)
    seen_by_eval = []

    def eval_fn():
        seen_by_eval.append(net.bn.running_mean.clone())
        return {"bbox": {"AP": 1.0 + len(seen_by_eval)}}

    hook = PreciseBN(3, net, iter(data), num_iter=2, ema_eval_function=eval_fn, ema_eval_period=6)
    trainer = _FakeTrainer(max_iter=9)
    hook.trainer = trainer
    runs = []
    for it in range(9):
        trainer.iter = it
        trainer.storage.iter = it
        ema = net.bn.running_mean.clone()
        hook.after_step()
        if not torch.equal(ema, net.bn.running_mean):
            runs.append(it + 1)
    assert runs == [3, 6, 9]
    # EMA evaluation only where an evaluation follows (6: period, 9: final), before the update
    assert len(seen_by_eval) == 2
    hist = trainer.storage.histories()
    assert [v for v, _ in hist["ema/bbox/AP"].values()] == [2.0, 3.0]
    assert [v for v, _ in hist["precise_bn/samples"].values()] == [4.0, 4.0, 4.0]
    for key in ("precise_bn/seconds", "precise_bn/ema_mean_rel_dist", "precise_bn/ema_var_rel_dist",
                "precise_bn/rel_error/max", "precise_bn/rel_error_mean/bn/max", "precise_bn/rel_error_std/bn/median"):
        assert len(hist[key].values()) == 3, key
    # the last run used batches 10 and 11 of the one iterator kept across runs
    mean, var = _exact_bn_inputs(net, data[4:6])
    torch.testing.assert_close(net.bn.running_mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(net.bn.running_var.double(), var, rtol=1e-6, atol=1e-6)


def test_precise_bn_hook_disabled_without_bn():
    hook = PreciseBN(1, nn.Linear(2, 2), [torch.zeros(1, 2)], 1)
    assert hook.disabled and hook.update_stats() is None


def test_statistics_distance():
    a = {"m.running_mean": torch.tensor([3.0, 4.0]), "m.running_var": torch.tensor([1.0, 1.0])}
    b = {"m.running_mean": torch.tensor([3.0, 4.0 + 0.5]), "m.running_var": torch.tensor([1.0, 1.0])}
    d = bn_statistics_distance(b, a)
    assert d["mean"] == pytest.approx(0.1) and d["var"] == 0.0
    assert set(snapshot_bn_statistics(_Net())) == {"bn.running_mean", "bn.running_var"}


def test_frozen_bn_late_uses_population_statistics_and_survives_train():
    net = _Net()
    net.bn.running_mean.uniform_(-1, 1)
    net.bn.running_var.uniform_(0.5, 2)
    data = _data(2, 6)
    precise = PreciseBN(0, net, iter(data), num_iter=3)
    hook = FrozenBNLate(net, start_iter=2, precise_bn=precise)
    trainer = _FakeTrainer(max_iter=4)
    hook.trainer = precise.trainer = trainer
    trainer.iter = 1
    hook.before_step()
    assert not hook.frozen
    trainer.iter = 2
    hook.before_step()
    assert hook.frozen and precise.disabled
    # precise statistics computed right before freezing, from the first 3 batches
    mean, var = _exact_bn_inputs(net, data[:3])
    torch.testing.assert_close(net.bn.running_mean.double(), mean, rtol=1e-6, atol=1e-6)
    frozen_stats = copy.deepcopy(net.bn.state_dict())

    net.train()  # the freeze survives model.train()
    x = data[4].requires_grad_()
    y = net(x)
    ref = F.batch_norm(net.conv(x), net.bn.running_mean, net.bn.running_var, net.bn.weight,
                       net.bn.bias, training=False, eps=net.bn.eps)
    torch.testing.assert_close(y, ref)
    y.square().sum().backward()
    assert net.bn.weight.grad is not None and net.bn.weight.grad.abs().sum() > 0  # affine learned
    for k, v in net.bn.state_dict().items():
        if k not in ("weight", "bias"):
            assert torch.equal(v, frozen_stats[k]), k
    assert net.bn.training  # the flag seen from outside is the caller's
    # the final PreciseBN does not overwrite the statistics training adapted to
    trainer.iter = 3
    precise.after_step()
    assert torch.equal(net.bn.running_mean, frozen_stats["running_mean"])
    hook.after_train()
    net(data[5])
    assert not torch.equal(net.bn.running_mean, frozen_stats["running_mean"])


def test_mini_batch_statistics_under_eval_leaves_buffers_and_restores_sync():
    net = _Net()
    net.bn = _SyncFlagBN(4)
    net.eval()
    before = copy.deepcopy(net.state_dict())
    x = _data(3, 1)[0]
    with torch.no_grad(), mini_batch_statistics(net):
        y = net(x)
    with torch.no_grad():
        ref = F.batch_norm(net.conv(x), None, None, net.bn.weight, net.bn.bias, training=True,
                           eps=net.bn.eps)
    torch.testing.assert_close(y, ref)
    assert net.bn.seen == [False] and net.bn.sync_stats is True
    assert not net.bn.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():  # outside the block: population statistics again
        torch.testing.assert_close(net(x), F.batch_norm(net.conv(x), net.bn.running_mean, net.bn.running_var,
                                                        net.bn.weight, net.bn.bias, False, 0.0, net.bn.eps))


def test_force_bn_mode_restores_hooks():
    net = _Net()
    with force_bn_mode(net, False):
        assert len(net.bn._forward_pre_hooks) == 1
    assert not net.bn._forward_pre_hooks and not net.bn._forward_hooks


def test_bad_hook_arguments():
    with pytest.raises(ValueError, match="period"):
        PreciseBN(-1, _Net(), [], 1)
    with pytest.raises(ValueError, match="start_iter"):
        FrozenBNLate(_Net(), -2)


# ----------------------------------------------------------- running statistics across workers

def _average_across_workers():
    """Each rank trains its own batches; the hook averages at its iterations only."""
    import torch.distributed as dist

    rank = dist.get_rank()
    data = _data(seed=10 + rank, n=10)
    every_step, at_end, hooked = _Net(), _Net(), _Net()  # same initial weights
    hook = AverageBNStatistics(hooked, periods=(4,), iterations=[7])
    hook.trainer = _FakeTrainer(max_iter=10)
    averaged_after = []
    with torch.no_grad():
        for it, x in enumerate(data):
            every_step(x), at_end(x), hooked(x)
            assert average_running_statistics(every_step) == 1
            before = hooked.bn.running_mean.clone()
            hook.trainer.iter = it
            hook.after_step()
            if not torch.equal(before, hooked.bn.running_mean):
                averaged_after.append(it + 1)
    own = snapshot_bn_statistics(at_end)
    average_running_statistics(at_end)
    snapshots = [snapshot_bn_statistics(net) for net in (at_end, every_step, hooked)]
    return (own, *snapshots, averaged_after)


def test_running_statistics_averaged_across_two_gloo_workers(run_workers):
    """The mean over workers, identical on both ranks; at the end = after every step (the EMA is linear)."""
    (own0, end0, every0, hooked0, at), (own1, end1, every1, hooked1, at1) = run_workers(_average_across_workers)
    assert at == at1 == [4, 7, 8, 10]  # its periods, its iterations and the last
    assert not torch.equal(own0["bn.running_mean"], own1["bn.running_mean"])
    for key in own0:
        assert torch.equal(end0[key], end1[key]) and torch.equal(hooked0[key], hooked1[key])
        torch.testing.assert_close(end0[key], (own0[key].double() + own1[key].double()).div(2).float())
        torch.testing.assert_close(every0[key], end0[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(hooked0[key], end0[key], rtol=1e-5, atol=1e-6)


def test_average_running_statistics_alone_does_nothing():
    net = _Net()
    net(torch.randn(2, 3, 4, 4))
    before = snapshot_bn_statistics(net)
    assert average_running_statistics(net) == 0
    assert all(torch.equal(before[k], v) for k, v in snapshot_bn_statistics(net).items())


# ----------------------------------------------------------- BNTrainer (toy RetinaNet)

def _toy_cfg(*opts):
    from d2_batchnorm.engine import load_config

    return load_config(
        "configs/Toy/retinanet_R18_FPN_bn_head.yaml",
        ["SOLVER.MAX_ITER", "10", "OUTPUT_DIR", "/tmp/d2bn_test_hooks", *opts],
    )


def test_bntrainer_hook_order_and_mini_batch_test_loader():
    from detectron2.engine import hooks as d2_hooks

    from d2_batchnorm.engine import BNTrainer

    cfg = _toy_cfg("TEST.PRECISE_BN.ENABLED", "True", "BN.FROZEN_LAST_ITERS", "3",
                   "TEST.PRECISE_BN.IMS_PER_BATCH", "2", "TEST.PRECISE_BN.DATASETS",
                   "('toy_coco_shifted_train',)", "TEST.PRECISE_BN.TARGET_REL_ERROR", "0.05")
    trainer = BNTrainer(cfg)
    kinds = [type(h) for h in trainer._hooks]
    assert kinds.index(PreciseBN) < kinds.index(FrozenBNLate) < kinds.index(d2_hooks.PeriodicCheckpointer)
    assert kinds.index(d2_hooks.PeriodicCheckpointer) < kinds.index(d2_hooks.EvalHook)
    precise = trainer._hooks[kinds.index(PreciseBN)]
    assert precise._target_rel_error == 0.05  # adaptive PreciseBN from the config
    batch = next(precise._batches())  # its loader is built at the first run
    assert len(batch) == 2 and "toy_coco_shifted" in batch[0]["file_name"]

    mb = _toy_cfg("TEST.BN_STATS", "mini_batch", "TEST.IMS_PER_BATCH", "3")
    loader = BNTrainer.build_test_loader(mb, "toy_coco_val")
    assert len(next(iter(loader))) == 3
    assert len(next(iter(BNTrainer.build_test_loader(cfg, "toy_coco_val")))) == 1
