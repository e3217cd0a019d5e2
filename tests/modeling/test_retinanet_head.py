"""
BNRetinaNet / BNRetinaNetHead and build_model's norm resolution; a 2-process toy
RetinaNet with "SyncBN" in backbone, FPN and head trained a few iterations on CPU/gloo.
"""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from torch import nn

from d2_batchnorm import add_batchnorm_config, validate_batchnorm_config
from d2_batchnorm.layers import GhostBatchNorm, LevelBatchNorm, SyncBatchNorm
from d2_batchnorm.modeling import build_model
from d2_batchnorm.modeling.retinanet import BNRetinaNetHead

C, L = 32, 3
SHAPES = [ShapeSpec(channels=C, stride=8 * 2**i) for i in range(L)]


def _cfg(**opts):
    cfg = add_batchnorm_config(get_cfg())
    cfg.merge_from_file("configs/Toy/retinanet_R18_FPN_bn_head.yaml")
    cfg.MODEL.DEVICE = "cpu"
    for key, value in opts.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return cfg


def _features(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, C, 8 // 2**i, 8 // 2**i, generator=g) * (i + 1) for i in range(L)]


def _head(**kw):
    args = dict(input_shape=SHAPES, num_classes=3, num_anchors=2, conv_dims=[C, C])
    args.update(kw)
    return BNRetinaNetHead(**args)


def test_per_level_head_equals_detectron2_cycle_bn_head():
    """per_level statistics = detectron2's CycleBatchNormList head, outputs and running stats."""
    torch.manual_seed(0)
    ref = RetinaNetHead(input_shape=SHAPES, num_classes=3, num_anchors=2, conv_dims=[C, C], norm="BN")
    head = _head(norm="BN", norm_stats="per_level")
    missing, unexpected = head.load_state_dict(ref.state_dict(), strict=False)
    assert not [k for k in missing if "running" not in k and "num_batches" not in k]
    feats = _features()
    for _ in range(2):
        out, ref_out = head(feats), ref(feats)
    for a, b in zip(out[0] + out[1], ref_out[0] + ref_out[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    norm, ref_norm = head.cls_subnet[1], ref.cls_subnet[1]
    assert isinstance(norm, LevelBatchNorm) and norm.running_mean.shape == (L, C)
    for i in range(L):
        torch.testing.assert_close(norm.running_mean[i], ref_norm[i].running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(norm.running_var[i], ref_norm[i].running_var, atol=1e-5, rtol=1e-5)


def test_head_statistics_modes():
    shared = _head(norm="BN", norm_stats="shared", population_stats="per_level", share_affine=False)
    norm = shared.bbox_subnet[1]
    assert (norm.stats, norm.population_stats) == ("shared", "per_level")
    assert norm.running_mean.shape == (L, C) and norm.weight.shape == (L, C)
    naive = _head(norm="BN", norm_stats="naive")
    assert type(naive.cls_subnet[1]) is nn.BatchNorm2d
    sync = _head(norm="SyncBN", norm_stats="shared")
    assert sync.cls_subnet[1].sync_stats and sync.cls_subnet[1].running_mean.shape == (C,)
    assert isinstance(_head(norm="GN").cls_subnet[1], nn.GroupNorm)
    assert len(_head(norm="").cls_subnet) == 4  # conv, relu, conv, relu
    for head in (shared, naive, sync):
        logits, deltas = head(_features())
        assert [t.shape for t in logits] == [(2, 6, 8 // 2**i, 8 // 2**i) for i in range(L)]
        head.eval()
        assert head(_features())[1][2].shape == (2, 8, 2, 2)


def test_head_bad_input():
    with pytest.raises(ValueError, match=r"^norm_stats = 'joint' is not allowed; allowed values"):
        _head(norm="BN", norm_stats="joint")
    with pytest.raises(ValueError, match=r"^population_stats = 'shared' is not allowed with norm_stats = 'naive'"):
        _head(norm="BN", norm_stats="naive", population_stats="shared")
    with pytest.raises(ValueError, match="expected 3 FPN levels"):
        _head(norm="BN")(_features()[:2])
    cfg = _cfg(**{"MODEL.RETINANET.NORM": "BatchNorm"})
    with pytest.raises(ValueError, match=r"MODEL.RETINANET.NORM = 'BatchNorm' is not allowed; allowed values: \[.*'GhostBN'\]"):
        validate_batchnorm_config(cfg)
    cfg = _cfg(**{"MODEL.RESNETS.NORM": "GhostBN", "BN.GHOST_BATCH_SIZE": 3})
    with pytest.raises(ValueError, match="BN.GHOST_BATCH_SIZE = 3 is not allowed with MODEL.RESNETS.NORM"):
        validate_batchnorm_config(cfg, world_size=2)
    cfg = _cfg(**{"MODEL.RETINANET.NORM_STATS": "naive", "MODEL.RETINANET.POPULATION_STATS": "shared"})
    with pytest.raises(ValueError, match="POPULATION_STATS = 'shared' is not allowed with"):
        validate_batchnorm_config(cfg)


def test_build_model_resolves_norm_names_everywhere():
    cfg = _cfg(**{
        "MODEL.META_ARCHITECTURE": "BNRetinaNet", "MODEL.RESNETS.NORM": "GhostBN",
        "MODEL.FPN.NORM": "SyncBN", "MODEL.RETINANET.NORM": "SyncBN", "BN.GHOST_BATCH_SIZE": 2,
    })
    model = build_model(cfg)
    assert type(model.backbone.bottom_up.stem.conv1.norm) is GhostBatchNorm
    assert model.backbone.bottom_up.stem.conv1.norm.ghost_batch_size == 2
    assert type(model.backbone.fpn_lateral3.norm) is SyncBatchNorm
    assert isinstance(model.head.cls_subnet[1], LevelBatchNorm) and model.head.cls_subnet[1].sync_stats
    # detectron2's own RetinaNet head: "SyncBN" (nn.SyncBatchNorm per level) is converted too
    d2 = build_model(_cfg(**{"MODEL.META_ARCHITECTURE": "RetinaNet", "MODEL.RETINANET.NORM": "SyncBN"}))
    assert not any(type(m) is nn.SyncBatchNorm for m in d2.modules())
    assert all(type(m) is SyncBatchNorm for m in d2.head.cls_subnet[1])
    ghost = build_model(_cfg(**{"MODEL.META_ARCHITECTURE": "RetinaNet", "MODEL.RETINANET.NORM": "GhostBN"}))
    assert all(type(m) is GhostBatchNorm and not m.affine for m in ghost.head.cls_subnet[1])
    # our head with a name detectron2's get_norm does not know (detectron2's from_config builds
    # the meta-architecture, our head replaces its head)
    ours = build_model(_cfg(**{"MODEL.META_ARCHITECTURE": "BNRetinaNet", "MODEL.RETINANET.NORM": "GhostBN"}))
    assert type(ours.head) is BNRetinaNetHead and type(ours.head.cls_subnet[1]) is GhostBatchNorm


def _batch(rank, n=2, size=64):
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(100 + rank)
    batch = []
    for _ in range(n):
        xy = torch.randint(0, size // 2, (2,), generator=g).float()
        boxes = Boxes(torch.cat([xy, xy + 16 + torch.randint(0, 16, (2,), generator=g)]).unsqueeze(0))
        inst = Instances((size, size), gt_boxes=boxes, gt_classes=torch.tensor([rank % 3]))
        batch.append({"image": torch.rand(3, size, size, generator=g) * 255, "instances": inst})
    return batch


def _train_sync_bn_retinanet(iters):
    """Runs in each of 2 gloo processes: a few SGD steps of a SyncBN toy RetinaNet under DDP."""
    import time

    from detectron2.utils.events import EventStorage

    from d2_batchnorm import distributed as d
    from d2_batchnorm.engine.trainer import create_ddp_model

    cfg = _cfg(**{
        "MODEL.META_ARCHITECTURE": "BNRetinaNet", "MODEL.RESNETS.NORM": "SyncBN",
        "MODEL.FPN.NORM": "SyncBN", "MODEL.RETINANET.NORM": "SyncBN",
        "MODEL.RETINANET.NORM_STATS": "shared", "MODEL.FPN.OUT_CHANNELS": 32,
    })
    validate_batchnorm_config(cfg, world_size=2)
    try:
        SyncBatchNorm(4, sync_group_size=3)
        bad_group = None
    except ValueError as e:
        bad_group = str(e)
    start = time.perf_counter()
    torch.manual_seed(0)  # same initial weights on both ranks
    model = create_ddp_model(build_model(cfg))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rank, losses = d.group_rank(), []
    with EventStorage():
        for _ in range(iters):
            loss = sum(model(_batch(rank, n=1)).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
    inner = model.module
    stem, head = inner.backbone.bottom_up.stem.conv1.norm, inner.head.cls_subnet[1]
    return {
        "losses": losses,
        "types": sorted({type(m).__name__ for m in inner.modules() if "Norm" in type(m).__name__}),
        "stem_mean": stem.running_mean.tolist(),
        "head_mean": head.running_mean.tolist(),
        "weight": inner.head.cls_score.weight.flatten()[:5].tolist(),
        "bad_group": bad_group,
        "seconds": time.perf_counter() - start,
    }


def test_two_process_sync_bn_retinanet_trains(run_workers):
    r0, r1 = run_workers(_train_sync_bn_retinanet, 2)
    assert r0["types"] == ["LevelBatchNorm", "SyncBatchNorm"]
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in (r0, r1))
    assert r0["losses"][0] != r1["losses"][0]  # different data on each rank ...
    # ... but synchronized statistics and DDP-averaged weights are the same on both ranks
    assert r0["stem_mean"] == pytest.approx(r1["stem_mean"], abs=1e-6)
    assert r0["head_mean"] == pytest.approx(r1["head_mean"], abs=1e-6)
    assert r0["weight"] == pytest.approx(r1["weight"], abs=1e-6)
    assert "must be 0 (all workers) or a positive divisor of the number of workers (2)" in r0["bad_group"]


def test_checkpoint_population_statistics_recomputed_in_other_mode(tmp_path):
    """A per_level checkpoint loads into a shared-population model; PreciseBN fills (C,) buffers."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.utils.events import EventStorage

    from d2_batchnorm import update_bn_stats

    opts = {"MODEL.META_ARCHITECTURE": "BNRetinaNet", "MODEL.RETINANET.NORM_STATS": "shared",
            "MODEL.RETINANET.POPULATION_STATS": "per_level", "OUTPUT_DIR": str(tmp_path)}
    torch.manual_seed(0)
    trained = build_model(_cfg(**opts))
    DetectionCheckpointer(trained, str(tmp_path)).save("model")
    opts["MODEL.RETINANET.POPULATION_STATS"] = "shared"
    model = build_model(_cfg(**opts))
    DetectionCheckpointer(model).load(str(tmp_path / "model.pth"))  # (L, C) buffers skipped
    torch.testing.assert_close(model.head.cls_subnet[0].weight, trained.head.cls_subnet[0].weight)
    norm = model.head.cls_subnet[1]
    assert norm.running_mean.shape == (64,)
    model.train()
    with EventStorage():
        update_bn_stats(model, [_batch(0), _batch(1)], num_iters=2)
    assert norm.running_mean.abs().sum() > 0 and torch.isfinite(norm.running_var).all()
