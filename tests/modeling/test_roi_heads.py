"""
Tests of the registered R-CNN heads with leakage mitigation (d2_batchnorm.modeling.roi_heads).

Multi-process tests run in real gloo processes and compare against independent
computations: a head without shuffle (norm replaced by the identity, so RoIs do not
interact and shuffling must not change anything), and a plain BN head on the concatenated
batch of all workers (what SyncBN must equal).
"""
import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import ROI_BOX_HEAD_REGISTRY, ROI_MASK_HEAD_REGISTRY
from torch import nn

import d2_batchnorm  # noqa: F401  (registers the heads)
from d2_batchnorm.engine import get_bn_cfg
from d2_batchnorm.modeling.roi_heads import BNConvFCHead, BNMaskRCNNConvUpsampleHead

BOX_COUNTS = [7, 3]  # uneven
BOX_COUNTS_EMPTY = [6, 0]  # with an empty worker (its RoIs stay where they are)
MASK_IMAGES = [[3, 2], [0, 4]]  # foreground RoIs per image on each worker


def _box_head(mitigation, norm="BN"):
    torch.manual_seed(0)
    return BNConvFCHead(
        ShapeSpec(channels=4, height=5, width=5),
        conv_dims=[8, 8],
        fc_dims=[16],
        conv_norm=norm,
        leakage_mitigation=mitigation,
    ).double()


def _mask_head(mitigation, num_classes=2):
    torch.manual_seed(0)
    return BNMaskRCNNConvUpsampleHead(
        ShapeSpec(channels=4, height=6, width=6),
        num_classes=num_classes,
        conv_dims=[8, 8, 8],
        conv_norm="BN",
        leakage_mitigation=mitigation,
    ).double()


def _identity_norms(head):
    for module in head.modules():
        if hasattr(module, "norm") and module.norm is not None:
            module.norm = nn.Identity()
    return head


def _box_input(rank, n):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(n, 4, 5, 5, generator=g, dtype=torch.float64)


def _mask_instances(rank, per_image):
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(200 + rank)
    instances = []
    for n in per_image:
        inst = Instances((24, 24))
        xy = torch.rand(n, 2, generator=g) * 10
        inst.proposal_boxes = Boxes(torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=g) * 5], 1))
        inst.gt_classes = torch.randint(0, 2, (n,), generator=g)
        inst.gt_masks = BitMasks(torch.rand(n, 24, 24, generator=g) > 0.5)
        instances.append(inst)
    x = torch.randn(sum(per_image), 4, 6, 6, generator=g, dtype=torch.float64)
    return x, instances


def _run_box(mitigation, identity, counts=BOX_COUNTS):
    from detectron2.utils import comm

    rank = comm.get_rank()
    head = _box_head(mitigation).train()
    if identity:
        _identity_norms(head)
    x = _box_input(rank, counts[rank]).requires_grad_(True)
    out = head(x)
    weights = torch.arange(out.numel(), dtype=torch.float64).view_as(out) / 100
    (out * weights).sum().backward()
    return {
        "out": out.detach().numpy(),
        "x_grad": x.grad.numpy(),
        "param_grads": {k: p.grad.numpy() for k, p in head.named_parameters()},
    }


def _run_mask(mitigation):
    from detectron2.utils import comm
    from detectron2.utils.events import EventStorage

    rank = comm.get_rank()
    head = _identity_norms(_mask_head(mitigation).train())
    x, instances = _mask_instances(rank, MASK_IMAGES[rank])
    x.requires_grad_(True)
    with EventStorage(0):
        loss = head(x, instances)["loss_mask"]
        logits = head.layers(x)
    loss.backward()
    return {
        "loss": float(loss),
        "logits": logits.detach().numpy(),
        "x_grad": x.grad.numpy(),
        "param_grads": {k: p.grad.numpy() for k, p in head.named_parameters()},
    }


def _summed_param_grads(results):
    return {k: sum(torch.as_tensor(r["param_grads"][k]) for r in results) for k in results[0]["param_grads"]}


def _assert_same(a, b):
    for ra, rb in zip(a, b):
        for key in ("out", "logits", "x_grad"):
            if key in ra:
                torch.testing.assert_close(torch.as_tensor(ra[key]), torch.as_tensor(rb[key]))
        if "loss" in ra:
            assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-10)
    ga, gb = _summed_param_grads(a), _summed_param_grads(b)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k])


@pytest.mark.parametrize("counts", [BOX_COUNTS, BOX_COUNTS_EMPTY])
def test_box_head_with_identity_norm_is_unchanged_by_shuffle(run_workers, counts):
    shuffled = run_workers(_run_box, "shuffle", True, counts)
    plain = run_workers(_run_box, "none", True, counts)
    _assert_same(shuffled, plain)


def test_mask_head_with_identity_norm_same_losses_with_shuffle(run_workers):
    shuffled = run_workers(_run_mask, "shuffle")
    plain = run_workers(_run_mask, "none")
    _assert_same(shuffled, plain)


def _run_box_pair():
    """BN head with and without shuffle in the same processes."""
    return _run_box("shuffle", False)["out"], _run_box("none", False)["out"]


def test_shuffle_changes_bn_statistics(run_workers):
    (shuffled, plain), _ = run_workers(_run_box_pair)
    assert shuffled.shape == plain.shape
    assert not torch.allclose(torch.as_tensor(shuffled), torch.as_tensor(plain))


@pytest.mark.parametrize("counts", [BOX_COUNTS, BOX_COUNTS_EMPTY])
def test_syncbn_head_equals_bn_head_on_the_concatenated_batch(run_workers, counts):
    results = run_workers(_run_box, "syncbn", False, counts)
    # independent computation: one process, plain BN over both workers' RoIs
    head = _box_head("none").train()
    x = torch.cat([_box_input(r, n) for r, n in enumerate(counts)]).requires_grad_(True)
    out = head(x)
    torch.testing.assert_close(torch.cat([torch.as_tensor(r["out"]) for r in results]), out.detach())


def test_single_process_shuffle_is_a_noop_and_eval_never_shuffles():
    x = _box_input(0, 5)
    for train in (True, False):
        a, b = _box_head("shuffle").train(train), _box_head("none").train(train)
        torch.testing.assert_close(a(x), b(x))


def _cfg(**overrides):
    cfg = get_bn_cfg()
    cfg.MODEL.ROI_BOX_HEAD.NAME = "BNConvFCHead"
    cfg.MODEL.ROI_MASK_HEAD.NAME = "BNMaskRCNNConvUpsampleHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_CONV, cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 4, 1
    cfg.MODEL.ROI_BOX_HEAD.CONV_DIM, cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 32, 64
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 32
    cfg.MODEL.ROI_BOX_HEAD.NORM = cfg.MODEL.ROI_MASK_HEAD.NORM = "BN"
    for key, value in overrides.items():
        node, name = key.split("__")
        cfg.MODEL[node][name] = value
    return cfg


def test_registered_heads_from_config_4conv1fc():
    cfg = _cfg(ROI_BOX_HEAD__LEAKAGE_MITIGATION="syncbn", ROI_MASK_HEAD__LEAKAGE_MITIGATION="shuffle")
    box = ROI_BOX_HEAD_REGISTRY.get("BNConvFCHead")(cfg, ShapeSpec(channels=16, height=7, width=7))
    mask = ROI_MASK_HEAD_REGISTRY.get("BNMaskRCNNConvUpsampleHead")(cfg, ShapeSpec(channels=16, height=14, width=14))
    assert len(box.conv_norm_relus) == 4 and len(box.fcs) == 1
    assert all(type(c.norm).__name__ == "SyncBatchNorm" for c in box.conv_norm_relus)
    assert all(type(c.norm) is nn.BatchNorm2d for c in mask.conv_norm_relus)
    assert box.leakage_mitigation == "syncbn" and mask.leakage_mitigation == "shuffle"
    assert box(torch.randn(3, 16, 7, 7)).shape == (3, 64)
    assert mask.layers(torch.randn(2, 16, 14, 14)).shape == (2, 80, 28, 28)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"ROI_BOX_HEAD__LEAKAGE_MITIGATION": "shuffle", "ROI_BOX_HEAD__NORM": "GN"},
         r"MODEL.ROI_BOX_HEAD.LEAKAGE_MITIGATION = 'shuffle'.*MODEL.ROI_BOX_HEAD.NORM = 'GN'"),
        ({"ROI_MASK_HEAD__LEAKAGE_MITIGATION": "syncbn", "ROI_MASK_HEAD__NORM": ""},
         r"MODEL.ROI_MASK_HEAD.LEAKAGE_MITIGATION = 'syncbn'.*MODEL.ROI_MASK_HEAD.NORM = ''"),
        ({"ROI_BOX_HEAD__LEAKAGE_MITIGATION": "shufle"},
         r"MODEL.ROI_BOX_HEAD.LEAKAGE_MITIGATION = 'shufle'.*\['none', 'syncbn', 'shuffle'\]"),
        ({"ROI_BOX_HEAD__LEAKAGE_MITIGATION": "shuffle", "ROI_BOX_HEAD__NAME": "FastRCNNConvFCHead"},
         r"MODEL.ROI_BOX_HEAD.NAME = 'FastRCNNConvFCHead'.*BNConvFCHead"),
    ],
)
def test_bad_config_is_refused_at_config_time_and_build_time(overrides, match):
    from d2_batchnorm.config import validate_batchnorm_config

    cfg = _cfg(**overrides)
    with pytest.raises(ValueError, match=match):
        validate_batchnorm_config(cfg)
    if "ROI_BOX_HEAD__NAME" not in overrides:
        with pytest.raises(ValueError, match=match):
            box = BNConvFCHead(cfg, ShapeSpec(channels=16, height=7, width=7))
            BNMaskRCNNConvUpsampleHead(cfg, ShapeSpec(channels=16, height=14, width=14))
            del box


def test_bad_arguments_of_directly_built_heads():
    with pytest.raises(ValueError, match=r"leakage_mitigation = 'shuffle'.*conv_norm = 'FrozenBN'"):
        _box_head("shuffle", norm="FrozenBN")
    with pytest.raises(ValueError, match=r"conv_norm = 'BatchNorm'.*allowed values"):
        _box_head("none", norm="BatchNorm")
