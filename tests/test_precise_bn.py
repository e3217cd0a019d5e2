"""
d2_batchnorm.update_bn_stats against independent computations: float64 mean / biased
variance of the concatenated BN inputs, fvcore on one process, and 2 real gloo ranks
against 1 process on the union of their data.
"""
import copy
import itertools
import logging

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from d2_batchnorm import update_bn_stats
from d2_batchnorm.early_exit import StopPlans
from d2_batchnorm.precise_bn import count_samples, get_bn_modules


def _exact(x: torch.Tensor):
    """float64 per-channel mean and biased variance over all dims but 1."""
    x = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)
    return x.mean(1), x.var(1, unbiased=False)


def _batches(seed, n, shape, scale=3.0, shift=1.5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * scale + shift for _ in range(n)]


def _assert_stats(bn, x, rtol=1e-6):
    mean, var = _exact(x)
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize(
    "bn_cls,shape",
    [(nn.BatchNorm1d, (6, 5)), (nn.BatchNorm1d, (6, 5, 7)), (nn.BatchNorm2d, (4, 5, 6, 6)),
     (nn.BatchNorm3d, (2, 5, 3, 4, 4))],
)
def test_population_statistics_equal_concatenated_inputs(bn_cls, shape):
    bn = bn_cls(shape[1])
    data = _batches(0, 7, shape)
    res = update_bn_stats(bn, data, num_iters=7)
    _assert_stats(bn, torch.cat(data))
    assert (res.num_iters, res.num_samples, res.num_modules) == (7, 7 * shape[0], 1)
    assert bn.num_batches_tracked.item() == 0  # restored


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4, momentum=0.3)
    )


def test_matches_fvcore_on_one_process():
    from fvcore.nn.precise_bn import update_bn_stats as fvcore_update

    model, ref = _convnet(), _convnet()
    data = _batches(1, 6, (3, 3, 9, 9))
    update_bn_stats(model, data, 6)
    fvcore_update(ref, data, 6)
    for a, b in zip(model.modules(), ref.modules()):
        if isinstance(a, nn.BatchNorm2d):
            torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-5, atol=1e-6)
            assert a.momentum == b.momentum


def test_weights_untouched_modes_and_momenta_restored_no_autograd():
    model = _convnet()
    model[4].eval()  # eval-mode BN: not a statistics module
    before = copy.deepcopy(model.state_dict())
    grads = []
    model[0].register_forward_hook(lambda m, i, o: grads.append(o.requires_grad))
    update_bn_stats(model, _batches(2, 3, (2, 3, 8, 8)), 3)
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith("1.running"):
            assert not torch.equal(v, after[k])
        else:
            assert torch.equal(v, after[k]), k
    assert model.training and model[1].training and not model[4].training
    assert model[1].momentum == 0.1 and model[4].momentum == 0.3
    assert grads and not any(grads)


class _CountingNet(nn.Module):
    """A BN, then python state a training forward updates (like detectron2's loss_normalizer)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        self.loss_normalizer = getattr(self, "loss_normalizer", 100.0) * 0.9 + 0.1 * float(x.shape[0])
        return self.bn(x)


def test_python_state_of_forwards_is_restored():
    model = _CountingNet()
    update_bn_stats(model, _batches(2, 3, (2, 3, 4, 4)), 3)
    assert model.forwards == 0 and not hasattr(model, "loss_normalizer")
    model(torch.zeros(2, 3, 4, 4))
    update_bn_stats(model, _batches(2, 3, (2, 3, 4, 4)), 3)
    assert model.forwards == 1 and model.loss_normalizer == 90.2


def test_detectron2_retinanet_loss_normalizer_untouched():
    """RetinaNet's training forwards update its loss_normalizer EMA, which PreciseBN must not."""
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    from d2_batchnorm.engine import load_config
    from d2_batchnorm.modeling import build_model

    cfg = load_config("configs/Base-RetinaNet-Toy.yaml", ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64"])
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)

    def image():
        instances = Instances((64, 64), gt_boxes=Boxes(torch.tensor([[8.0, 8.0, 40.0, 40.0]])),
                              gt_classes=torch.tensor([1]))
        return {"image": torch.rand(3, 64, 64, generator=g) * 255, "instances": instances}

    with EventStorage():  # detectron2 models log scalars in training mode
        update_bn_stats(model, [[image(), image()] for _ in range(2)], 2)
        assert not hasattr(model, "loss_normalizer")  # still detectron2's initial value on first use
        model([image(), image()])
        before = model.loss_normalizer
        update_bn_stats(model, [[image(), image()] for _ in range(2)], 2)
    assert model.loss_normalizer == before


class _Reuse(nn.Module):
    """One BN called on two different inputs per forward (e.g. shared across levels)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(x) + self.bn(x[:, :, ::2, ::2] * 2.0 + 1.0).sum()


def test_reused_bn_counts_every_call():
    model = _Reuse()
    data = _batches(3, 4, (2, 3, 6, 6))
    update_bn_stats(model, data, 4)
    pooled = torch.cat([t.flatten(2) for x in data for t in (x, x[:, :, ::2, ::2] * 2.0 + 1.0)], 2)
    _assert_stats(model.bn, pooled)


def test_cycle_batchnorm_list_per_level_statistics():
    from detectron2.layers import CycleBatchNormList

    bn = CycleBatchNormList(length=3, bn_class=nn.BatchNorm2d, num_features=4)
    bn.train()
    levels = [_batches(10 + i, 3, (2, 4, 8 >> i, 8 >> i), shift=i) for i in range(3)]

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = bn

        def forward(self, feats):
            return [self.norm(f) for f in feats]

    head = Head()
    update_bn_stats(head, [[lv[i] for lv in levels] for i in range(3)], 3)
    for i, lv in enumerate(levels):
        _assert_stats(bn[i], torch.cat(lv))


class _LevelBN(_BatchNorm):
    """Test-local BN with (L, C) buffers, called with a list of L tensors (per-level stats)."""

    def __init__(self, levels, channels):
        super().__init__(channels)
        self.register_buffer("running_mean", torch.zeros(levels, channels))
        self.register_buffer("running_var", torch.ones(levels, channels))

    def forward(self, xs):
        return [x * self.weight.view(1, -1, 1, 1) for x in xs]


def test_level_statistics_rows_and_shared_rows():
    bn = _LevelBN(2, 3)
    shared = nn.BatchNorm2d(3)
    data = [[x, y] for x, y in zip(_batches(4, 3, (2, 3, 8, 8)), _batches(5, 3, (2, 3, 4, 4), shift=-2))]

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.level, self.shared = bn, shared

        def forward(self, xs):
            return self.level(xs), self.shared(xs)

    class SharedList(nn.BatchNorm2d):
        def forward(self, xs):
            return [super(SharedList, self).forward(x) for x in xs]

    head = Head()
    head.shared = SharedList(3)
    update_bn_stats(head, data, 3)
    for i in range(2):
        mean, var = _exact(torch.cat([d[i] for d in data]))
        torch.testing.assert_close(bn.running_mean[i].double(), mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(bn.running_var[i].double(), var, rtol=1e-6, atol=1e-6)
    pooled = torch.cat([d[i].flatten(2) for d in data for i in range(2)], 2)
    _assert_stats(head.shared, pooled)


class _Branchy(nn.Module):
    """BN ``b`` is never called; counts how often the layer after the last BN runs."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.BatchNorm1d(3), nn.BatchNorm1d(3), nn.BatchNorm1d(3)
        self.frozen = nn.BatchNorm1d(3).eval()
        self.head = nn.Linear(3, 1)
        self.tail_calls = []  # a list: update_bn_stats restores python scalars a forward changes
        self.head.register_forward_hook(lambda *_: self.tail_calls.append(1))

    def forward(self, x):
        return self.head(self.c(self.frozen(self.a(x))))


def test_uncalled_bn_kept_with_warning_and_forward_stops_after_last_bn(caplog):
    model = _Branchy()
    before_b = model.b.running_var.clone()
    before_frozen = model.frozen.running_mean.clone()
    with caplog.at_level(logging.WARNING, logger="d2_batchnorm.precise_bn"):
        res = update_bn_stats(model, _batches(6, 5, (4, 3)), 5)
    assert res.uncalled == ("b",) and "b" in caplog.text
    assert torch.equal(model.b.running_var, before_b)
    assert torch.equal(model.frozen.running_mean, before_frozen)
    assert len(model.tail_calls) == 1  # only the first forward (which learns the call order) runs to the end


def test_stop_plan_kept_across_calls_and_relearned_when_the_bn_set_changes():
    model, plans = _Branchy(), StopPlans()
    update_bn_stats(model, _batches(6, 3, (4, 3)), 3, stop_plans=plans)
    update_bn_stats(model, _batches(7, 3, (4, 3)), 3, stop_plans=plans)
    assert len(model.tail_calls) == 1  # the second call stops from its first batch
    model.a.eval()  # the set of BN modules in training mode changes: the plan is learned anew
    data = _batches(8, 3, (4, 3))
    update_bn_stats(model, data, 3, stop_plans=plans)
    assert len(model.tail_calls) == 2
    _assert_stats(model.c, torch.cat([model.frozen(model.a(x)) for x in data]))


class _Ordered(nn.Module):
    """BN ``a`` then ``b``, or ``b`` then ``a`` when ``swap``; counts the tail's runs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.BatchNorm1d(3), nn.BatchNorm1d(3), nn.Linear(3, 1)
        nn.init.uniform_(self.a.weight, 0.5, 2.0)
        nn.init.uniform_(self.b.bias, -1.0, 1.0)
        self.swap, self.tail_calls = False, []
        self.head.register_forward_hook(lambda *_: self.tail_calls.append(1))

    def forward(self, x):
        first, second = (self.b, self.a) if self.swap else (self.a, self.b)
        return self.head(second(first(x)))


def test_stop_plan_not_trusted_when_the_call_order_changes():
    from fvcore.nn.precise_bn import update_bn_stats as fvcore_update

    model, plans = _Ordered(), StopPlans()
    update_bn_stats(model, _batches(9, 2, (4, 3)), 2, stop_plans=plans)
    assert len(model.tail_calls) == 1
    model.swap = True
    ref = copy.deepcopy(model)
    data = _batches(10, 4, (4, 3))
    update_bn_stats(model, data, 4, stop_plans=plans)
    # batch 1 does not match the plan and runs to its end, batch 2 learns the new order
    assert len(model.tail_calls) == 3
    fvcore_update(ref, data, 4)
    for bn, bn_ref in ((model.a, ref.a), (model.b, ref.b)):
        torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, bn_ref.running_var, rtol=1e-5, atol=1e-6)


def test_frozen_bn_untouched():
    from detectron2.layers import FrozenBatchNorm2d

    model = nn.Sequential(FrozenBatchNorm2d(3), nn.BatchNorm2d(3))
    data = _batches(7, 2, (2, 3, 5, 5))
    update_bn_stats(model, data, 2)
    assert torch.equal(model[0].running_mean, torch.zeros(3))
    _assert_stats(model[1], torch.cat(data))


def test_num_samples_with_infinite_cycle_and_no_len():
    bn = nn.BatchNorm1d(4)
    data = _batches(8, 3, (5, 4))
    res = update_bn_stats(bn, itertools.cycle(data), num_samples=12)  # 3 batches of 5 >= 12
    assert (res.num_iters, res.num_samples) == (3, 15)
    _assert_stats(bn, torch.cat(data))

    class NoLen:
        def __iter__(self):
            return iter(data)

        def __len__(self):
            raise AssertionError("len() called")

    update_bn_stats(nn.BatchNorm1d(4), NoLen(), 2)


def test_restores_everything_when_a_batch_fails():
    model = _convnet()
    model[4].momentum = None
    state = copy.deepcopy(model.state_dict())

    def loader():
        yield from _batches(9, 2, (2, 3, 8, 8))
        yield torch.randn(2, 5, 8, 8)  # wrong channel count: the conv raises

    model[1].eval()
    model[1].train()
    with pytest.raises(RuntimeError):
        update_bn_stats(model, loader(), 5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert model[4].momentum is None and model[1].momentum == 0.1 and model.training


@pytest.mark.parametrize("kwargs,name", [({"num_iters": 0}, "num_iters"), ({"num_iters": -3}, "num_iters"),
                                         ({"num_samples": 0}, "num_samples"), ({"num_iters": 2.5}, "num_iters")])
def test_bad_counts_raise_value_error(kwargs, name):
    with pytest.raises(ValueError, match=name):
        update_bn_stats(nn.BatchNorm1d(2), [torch.randn(3, 2)], **kwargs)


def test_no_bn_and_empty_loader_warn_and_change_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="d2_batchnorm.precise_bn"):
        res = update_bn_stats(nn.Linear(2, 2), [torch.randn(3, 2)], 1)
        assert res.num_modules == 0 and "no BN module" in caplog.text
        bn = nn.BatchNorm1d(2)
        res = update_bn_stats(bn, [], 3)
    assert res.num_iters == 0 and "yielded no batch" in caplog.text
    assert torch.equal(bn.running_mean, torch.zeros(2)) and torch.equal(bn.running_var, torch.ones(2))


def test_short_loader_uses_what_it_has(caplog):
    bn = nn.BatchNorm1d(2)
    data = _batches(11, 2, (4, 2))
    with caplog.at_level(logging.WARNING, logger="d2_batchnorm.precise_bn"):
        res = update_bn_stats(bn, data, 10)
    assert res.num_iters == 2 and "ended after 2 batches" in caplog.text
    _assert_stats(bn, torch.cat(data))


def test_count_samples_and_detectron2_batches():
    assert count_samples(torch.zeros(3, 2)) == 3
    assert count_samples([{"image": torch.zeros(3, 4, 4)}] * 5) == 5
    assert count_samples((torch.zeros(7, 1), torch.zeros(7))) == 7
    assert count_samples({"x": torch.zeros(2, 1)}) == 2
    with pytest.raises(ValueError, match="cannot count"):
        count_samples(object())


def test_get_bn_modules_includes_subclasses_and_skips_eval():
    from detectron2.layers import NaiveSyncBatchNorm

    model = nn.Sequential(nn.BatchNorm1d(2), NaiveSyncBatchNorm(2), nn.SyncBatchNorm(2), nn.BatchNorm2d(2).eval())
    assert [n for n, _ in get_bn_modules(model)] == ["0", "1", "2"]
    assert [n for n, _ in get_bn_modules(nn.DataParallel(model))] == ["0", "1", "2"]


# ---------------------------------------------------------------- 2 real gloo processes

def _rank_data(rank):
    # uneven loaders: rank 0 has 3 batches of 4, rank 1 has 5 batches of 2
    return _batches(100 + rank, 3, (4, 3, 5, 5)) if rank == 0 else _batches(101, 5, (2, 3, 5, 5))


def _two_rank_precise_bn(sync):
    from detectron2.layers import NaiveSyncBatchNorm
    from detectron2.utils import comm

    from d2_batchnorm.engine import create_ddp_model

    torch.manual_seed(0)
    norm = NaiveSyncBatchNorm(3, stats_mode="N") if sync else nn.BatchNorm2d(3)
    model = create_ddp_model(nn.Sequential(nn.Conv2d(3, 3, 1), norm))
    res = update_bn_stats(model, _rank_data(comm.get_rank()), num_iters=10)
    m = model.module[1]
    # numpy: tensors returned through a multiprocessing queue would need shared memory
    state = {k: v.numpy() for k, v in model.module[0].state_dict().items()}
    return res, m.running_mean.numpy(), m.running_var.numpy(), state


@pytest.mark.parametrize("sync", [False, True])
def test_two_ranks_equal_one_process_on_union_bitwise_equal(run_workers, sync):
    out = run_workers(_two_rank_precise_bn, sync)
    (r0, mean0, var0, conv), (r1, mean1, var1, _) = [
        (r, torch.from_numpy(m), torch.from_numpy(v), {k: torch.from_numpy(t) for k, t in c.items()})
        for r, m, v, c in out
    ]
    assert torch.equal(mean0, mean1) and torch.equal(var0, var1)
    assert r0._replace(errors={}) == r1._replace(seconds=r0.seconds, errors={})
    # the standard errors too are bitwise those of the other rank
    assert r0.errors.keys() == r1.errors.keys() == {"1"}
    assert all(torch.equal(a, b) for a, b in zip(r0.errors["1"], r1.errors["1"]))
    # both ranks stop when rank 0's loader ends: 3 batches each = 3*4 + 3*2 images
    assert (r0.num_iters, r0.num_samples) == (3, 18)
    conv_layer = nn.Conv2d(3, 3, 1)
    conv_layer.load_state_dict(conv)
    with torch.no_grad():
        union = torch.cat([conv_layer(x) for x in _rank_data(0)[:3] + _rank_data(1)[:3]])
    mean, var = _exact(union)
    torch.testing.assert_close(mean0.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var0.double(), var, rtol=1e-6, atol=1e-6)


def _two_rank_num_samples():
    from detectron2.utils import comm

    bn = nn.BatchNorm1d(2)
    data = _batches(200 + comm.get_rank(), 4, (3 + comm.get_rank(), 2))
    res = update_bn_stats(bn, itertools.cycle(data), num_samples=20)
    return res.num_iters, res.num_samples


def test_two_ranks_num_samples_is_global(run_workers):
    # 3 + 4 = 7 images per iteration over both ranks: 3 iterations reach 20
    assert run_workers(_two_rank_num_samples) == [(3, 21), (3, 21)]


def _two_rank_empty_on_one():
    from detectron2.utils import comm

    bn = nn.BatchNorm1d(2)
    data = [] if comm.get_rank() == 1 else _batches(300, 2, (3, 2))
    res = update_bn_stats(bn, data, 2)
    return res.num_iters, bn.running_mean.tolist()


def test_two_ranks_one_empty_loader_changes_nothing(run_workers):
    for iters, mean in run_workers(_two_rank_empty_on_one):
        assert iters == 0 and mean == [0.0, 0.0]


# ---------------------------------------------------------------- tools/precise_bn_checkpoint.py

def _checkpoint_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("precise_bn_checkpoint", "tools/precise_bn_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_precise_bn_checkpoint_tool(tmp_path):
    import json

    from d2_batchnorm.engine import BNTrainer, load_config

    tool = _checkpoint_tool()
    # opts reach the model build: a 1-conv head instead of the config's 2
    opts = ["MODEL.RETINANET.NUM_CONVS", "1", "OUTPUT_DIR", str(tmp_path)]
    cfg = load_config("configs/Toy/retinanet_R18_FPN_bn_head.yaml", opts)
    model = BNTrainer.build_model(cfg)
    torch.save({"model": model.state_dict()}, tmp_path / "in.pth")
    rc = tool.cli(["--config-file", "configs/Toy/retinanet_R18_FPN_bn_head.yaml", "--no-eval",
                   "MODEL.WEIGHTS", str(tmp_path / "in.pth"), "TEST.PRECISE_BN.NUM_SAMPLES", "4",
                   "TEST.PRECISE_BN.IMS_PER_BATCH", "2", *opts])
    assert rc == 0
    out = torch.load(tmp_path / "model_precise_bn.pth", weights_only=False)
    summary = json.loads((tmp_path / "model_precise_bn.json").read_text())
    assert summary["images"] == 4 and summary["iterations"] == 2 and summary["bn_modules"] > 0
    errors = summary["relative_standard_errors"]  # 2 units (batches): errors per module group
    assert errors["rel_error/min_units"] == 2 and 0 < errors["rel_error_mean/backbone.bottom_up/median"]
    before, after = model.state_dict(), out["model"]
    assert set(before) == set(after)
    key = "backbone.bottom_up.stem.conv1.norm.running_var"
    assert not torch.equal(before[key], after[key])
    for k in before:
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(before[k], after[k]), k
    assert tool.cli(["--config-file", "configs/Toy/retinanet_R18_FPN_bn_head.yaml"]) == 2  # no weights


def test_precise_bn_checkpoint_tool_with_a_lazy_config(tmp_path):
    """The same tool on a LazyConfig: key=value overrides, train.init_checkpoint, train.precise_bn.*."""
    import json

    from d2_batchnorm.engine import build_any_model, load_any_config

    config = "configs/Toy/retinanet_R18_FPN_bn_head.py"
    overrides = ["model.head.conv_dims=[64]", f"train.output_dir={tmp_path}"]  # a 1-conv head
    model = build_any_model(load_any_config(config, overrides))
    torch.save({"model": model.state_dict()}, tmp_path / "in.pth")
    tool = _checkpoint_tool()
    rc = tool.cli(["--config-file", config, "--no-eval", f"train.init_checkpoint={tmp_path / 'in.pth'}",
                   "train.precise_bn.num_samples=4", "train.precise_bn.ims_per_batch=2", *overrides])
    assert rc == 0
    summary = json.loads((tmp_path / "model_precise_bn.json").read_text())
    assert summary["images"] == 4 and summary["datasets"] == ["toy_coco_train"]
    after = torch.load(tmp_path / "model_precise_bn.pth", weights_only=False)["model"]
    key = "backbone.bottom_up.stem.conv1.norm.running_var"
    assert not torch.equal(model.state_dict()[key], after[key])


def test_precise_bn_checkpoint_tool_names_the_lazy_checkpoint_key(tmp_path, capsys):
    rc = _checkpoint_tool().cli(["--config-file", "configs/Toy/retinanet_R18_FPN_bn_head.py",
                                 f"train.output_dir={tmp_path}"])
    assert rc == 2
    assert capsys.readouterr().err == \
        "error: train.init_checkpoint is empty; pass the checkpoint as train.init_checkpoint=path.pth\n"


def test_precise_bn_checkpoint_tool_refuses_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    out = tmp_path / "out"
    rc = _checkpoint_tool().cli(["--config-file", "configs/Toy/retinanet_R18_FPN_bn_head.yaml",
                                 "MODEL.WEIGHTS", str(tmp_path / "notes.txt"), "OUTPUT_DIR", str(out)])
    assert rc == 2 and not out.exists()
    err = capsys.readouterr().err
    assert err == f"error: MODEL.WEIGHTS = '{tmp_path / 'notes.txt'}' is not a readable checkpoint: " \
        "neither a torch.save zip archive nor a pickle\n"


def _level_data(rank):
    g = torch.Generator().manual_seed(400 + rank)
    return [[torch.randn(2 + rank, 4, 6 >> i, 6 >> i, generator=g) * (i + 1) + i for i in range(3)]
            for _ in range(2)]


class _ProjectNorms(nn.Module):
    """d2_batchnorm.layers' synchronized SyncBatchNorm and per-level LevelBatchNorm."""

    def __init__(self):
        super().__init__()
        from d2_batchnorm.layers import LevelBatchNorm, SyncBatchNorm

        self.sync = SyncBatchNorm(4)
        self.level = LevelBatchNorm(4, 3, stats="per_level", sync_group_size=0)

    def forward(self, feats):
        return [self.sync(f) for f in feats], self.level(feats)


def _two_rank_project_norms():
    from detectron2.utils import comm

    model = _ProjectNorms()
    update_bn_stats(model, _level_data(comm.get_rank()), 2)
    return {k: v.numpy() for k, v in model.state_dict().items() if "running" in k}


def test_two_ranks_project_sync_and_level_norms_not_double_counted(run_workers):
    pytest.importorskip("d2_batchnorm.layers")
    s0, s1 = run_workers(_two_rank_project_norms)
    for k in s0:
        assert (s0[k] == s1[k]).all(), k
    data = _level_data(0) + _level_data(1)
    per_channel = [f.transpose(0, 1).reshape(4, -1) for feats in data for f in feats]
    mean, var = _exact(torch.cat(per_channel, 1).unsqueeze(0))
    torch.testing.assert_close(torch.from_numpy(s0["sync.running_mean"]).double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(s0["sync.running_var"]).double(), var, rtol=1e-6, atol=1e-6)
    assert s0["level.running_mean"].shape == (3, 4)
    for i in range(3):
        mean, var = _exact(torch.cat([feats[i] for feats in data]))
        torch.testing.assert_close(torch.from_numpy(s0["level.running_mean"][i]).double(), mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.from_numpy(s0["level.running_var"][i]).double(), var, rtol=1e-6, atol=1e-6)
