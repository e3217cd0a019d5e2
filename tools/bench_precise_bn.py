#!/usr/bin/env python
"""
Benchmark of d2_batchnorm.update_bn_stats against fvcore's update_bn_stats, side by side
in one run, on the same batches of detectron2 models in training mode (CPU, random
images with random boxes and masks):

* maskrcnn_a: Mask R-CNN R50-FPN, trainable BN in the backbone and FPN only (the common
  SyncBN set-up; heads without norm);
* maskrcnn_b: the same with BN in the box head (4conv1fc) and the mask head too;
* retinanet:  RetinaNet R50-FPN with a BN head (detectron2's per-level CycleBatchNormList).

For each case it reports the wall time of fvcore, of ours (with the standard errors of
its statistics), of ours adaptive (``target_rel_error`` never met, so the same batches
plus every stop check), of a plain backbone forward over the same batches
(preprocessing + backbone/FPN, no statistics: the floor for case a), their ratios, and
the largest relative error
``||running_x - exact_x||_2 / ||exact_x||_2`` over BN modules of the running mean/var
against the exact statistics of all samples (float64 two-pass: mean first, then squared
deviations, over the same batches). With ``--world-size 2`` it also runs both in 2 gloo
processes on different data and reports the largest |buffer difference| between ranks.
In the main table "ours" is a *first* call on the model (stop plans forgotten before each
run): its first forward runs the whole model once to learn where the last BN ends. A
second table times the same methods over ``--short-iters`` batches (default 4), ours both
as a first call and as a call on a model already seen (the plan kept from an earlier call,
as in PreciseBN's periodic runs during training). For case a it also times ours against
the backbone floor alone over ``--floor-iters`` batches. Last, the hidden cost of the
PreciseBN hook in a toy training (tools/bench_training.py; ``--no-training`` skips it).

    python tools/bench_precise_bn.py [--iters 20] [--short-iters 4] [--ims 2] [--size 128] \
        [--repeats 2] [--world-size 2] [--floor-iters 100]

Times are the minimum over ``--repeats`` interleaved runs (the machine may be shared).
"""
import argparse
import sys
import time
from typing import Dict, List

import torch
from torch import nn
import bench_training  # tools/bench_training.py
from bench_report import machine_description, write_section  # tools/bench_report.py
from torch.nn.modules.batchnorm import _BatchNorm

CASES = ("maskrcnn_a", "maskrcnn_b", "retinanet")


def build_case(case: str) -> nn.Module:
    """A detectron2 model (detectron2's own builder) in training mode on CPU."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    if case == "retinanet":
        cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
        cfg.MODEL.RETINANET.NORM = "BN"
    else:
        cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
        cfg.MODEL.FPN.NORM = "BN"
        cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 128
        if case == "maskrcnn_b":
            cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
            cfg.MODEL.ROI_BOX_HEAD.NUM_CONV = 4
            cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 1
            cfg.MODEL.ROI_BOX_HEAD.NORM = "BN"
            cfg.MODEL.ROI_MASK_HEAD.NORM = "BN"
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    return model


def make_batches(num: int, ims: int, size: int, seed: int) -> List[List[Dict]]:
    """``num`` detectron2 training batches of ``ims`` random images with 3 boxes + masks."""
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num):
        batch = []
        for _ in range(ims):
            image = (torch.rand(3, size, size, generator=g) * 255).round()
            xy = torch.rand(3, 2, generator=g) * size * 0.6
            wh = torch.rand(3, 2, generator=g) * size * 0.3 + size * 0.1
            boxes = torch.cat([xy, xy + wh], 1).clamp(max=size - 1)
            masks = torch.zeros(3, size, size, dtype=torch.bool)
            for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
                masks[i, y0:y1, x0:x1] = True
            inst = Instances((size, size), gt_boxes=Boxes(boxes),
                             gt_classes=torch.randint(0, 80, (3,), generator=g), gt_masks=BitMasks(masks))
            batch.append({"image": image, "instances": inst, "height": size, "width": size})
        batches.append(batch)
    return batches


def seeded(batches):
    """Yields the batches, re-seeding torch's RNG before each (RoI sampling is random)."""
    for i, b in enumerate(batches):
        torch.manual_seed(1000 + i)
        yield b


def bn_state(model) -> Dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


def set_bn_state(model, state) -> None:
    model.load_state_dict(state, strict=False)


def bn_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.training]


@torch.no_grad()
def exact_statistics(model, batches) -> Dict[str, torch.Tensor]:
    """float64 two-pass mean and biased variance of every BN module's inputs over all batches."""
    from detectron2.utils.events import EventStorage

    mods = bn_modules(model)
    sums = {n: 0.0 for n, _ in mods}
    counts = {n: 0 for n, _ in mods}
    means: Dict[str, torch.Tensor] = {}
    stage = {"pass": 1}

    def hook(name):
        def fn(module, args):
            x = args[0].double().transpose(0, 1).reshape(args[0].shape[1], -1)
            if stage["pass"] == 1:
                sums[name] = sums[name] + x.sum(1)
                counts[name] += x.shape[1]
            else:
                sums[name] = sums[name] + (x - means[name].unsqueeze(1)).square().sum(1)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods]
    saved = bn_state(model)
    try:
        with EventStorage():
            for b in seeded(batches):
                model(b)
            for n, _ in mods:
                means[n] = sums[n] / counts[n]
                sums[n] = 0.0
            stage["pass"] = 2
            for b in seeded(batches):
                model(b)
    finally:
        for h in handles:
            h.remove()
        set_bn_state(model, saved)
    out = {}
    for n, _ in mods:
        out[f"{n}.running_mean"] = means[n]
        out[f"{n}.running_var"] = sums[n] / counts[n]
    return out


def relative_errors(model, exact) -> Dict[str, float]:
    state = model.state_dict()
    err = {"mean": 0.0, "var": 0.0}
    for k, ref in exact.items():
        kind = "mean" if k.endswith("mean") else "var"
        e = float((state[k].double() - ref).norm() / ref.norm().clamp(min=1e-30))
        err[kind] = max(err[kind], e)
    return err


#: the stop plans of the models seen, as the PreciseBN hook keeps them across its runs
SEEN = None


def run_ours(model, batches):
    """A first call: the model's stop plan is learned anew (and kept for :func:`run_ours_seen`)."""
    global SEEN
    from d2_batchnorm import update_bn_stats
    from d2_batchnorm.early_exit import StopPlans

    SEEN = StopPlans()
    update_bn_stats(model, seeded(batches), len(batches), stop_plans=SEEN)


def run_ours_adaptive(model, batches):
    """
    Adaptive PreciseBN on the same batches: a target no run meets (1e-9), so it uses every
    batch and pays for every check (after each of the first 10 batches, then every ~10%).
    """
    from d2_batchnorm import update_bn_stats

    update_bn_stats(model, seeded(batches), len(batches), target_rel_error=1e-9)


def run_ours_seen(model, batches):
    """A call on a model seen before (its stop plan kept from an earlier call)."""
    global SEEN
    from d2_batchnorm import update_bn_stats
    from d2_batchnorm.early_exit import StopPlans

    SEEN = SEEN or StopPlans()
    update_bn_stats(model, seeded(batches), len(batches), stop_plans=SEEN)


def _row(*cells) -> str:
    """One row of a Markdown table."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def run_fvcore(model, batches):
    from fvcore.nn.precise_bn import update_bn_stats

    update_bn_stats(model, seeded(batches), len(batches))


@torch.no_grad()
def run_backbone(model, batches):
    for b in seeded(batches):
        model.backbone(model.preprocess_image(b).tensor)


def bench_case(case, args) -> Dict:
    """Times fvcore, ours and the backbone floor on the same batches; errors vs exact."""
    from detectron2.utils.events import EventStorage

    model = build_case(case)
    batches = make_batches(args.iters, args.ims, args.size, seed=1)
    initial = bn_state(model)
    with EventStorage():
        run_backbone(model, batches[:1])  # warm-up
    set_bn_state(model, initial)
    times = {"fvcore": [], "ours": [], "adaptive": [], "backbone": []}
    errors = {}
    runners = {"fvcore": run_fvcore, "ours": run_ours, "adaptive": run_ours_adaptive, "backbone": run_backbone}
    for rep in range(args.repeats):
        order = list(runners) if rep % 2 == 0 else list(reversed(runners))
        for name in order:
            set_bn_state(model, initial)
            with EventStorage():
                t0 = time.perf_counter()
                runners[name](model, batches)
                times[name].append(time.perf_counter() - t0)
            if rep == 0 and name in ("fvcore", "ours"):
                errors[name] = bn_state(model)
    set_bn_state(model, initial)
    exact = exact_statistics(model, batches)
    out = {"case": case, "bn_modules": len(bn_modules(model))}
    for name in ("fvcore", "ours"):
        set_bn_state(model, errors[name])
        out[f"err_{name}"] = relative_errors(model, exact)
    out.update({f"t_{k}": min(v) for k, v in times.items()})
    if args.short_iters > 0:
        # few batches: ours as a first call and on a model seen (plan kept from the run
        # above), interleaved with fvcore and the floor
        short = batches[: args.short_iters]
        short_runners = {"fvcore": run_fvcore, "ours": run_ours, "ours_seen": run_ours_seen,
                         "backbone": run_backbone}
        short_times = {k: [] for k in short_runners}
        for rep in range(args.repeats):
            order = list(short_runners) if rep % 2 == 0 else list(reversed(short_runners))
            for name in order:
                if name == "ours_seen":
                    set_bn_state(model, initial)
                    with EventStorage():
                        run_ours_seen(model, short)  # makes sure the plan exists (untimed)
                set_bn_state(model, initial)
                with EventStorage():
                    t0 = time.perf_counter()
                    short_runners[name](model, short)
                    short_times[name].append(time.perf_counter() - t0)
        out.update({f"s_{k}": min(v) for k, v in short_times.items()})
    if args.floor_iters > args.iters and case == "maskrcnn_a":
        # ours against the floor alone over more batches: the one full forward that learns
        # where to stop is amortized as over detectron2's default of 200 iterations
        more = make_batches(args.floor_iters, args.ims, args.size, seed=2)
        long_times = {"ours": [], "backbone": []}
        for rep in range(args.repeats):
            for name in (("ours", "backbone") if rep % 2 == 0 else ("backbone", "ours")):
                set_bn_state(model, initial)
                with EventStorage():
                    t0 = time.perf_counter()
                    runners[name](model, more)
                    long_times[name].append(time.perf_counter() - t0)
        out["t_ours_long"] = min(long_times["ours"])
        out["t_backbone_long"] = min(long_times["backbone"])
    return out


def _ranks_worker(case, iters, ims, size):
    from detectron2.utils import comm
    from detectron2.utils.events import EventStorage

    model = build_case(case)
    batches = make_batches(iters, ims, size, seed=10 + comm.get_rank())
    initial = bn_state(model)
    out = {}
    for name, fn in (("fvcore", run_fvcore), ("ours", run_ours)):
        set_bn_state(model, initial)
        with EventStorage():
            fn(model, batches)
        out[name] = {k: v.numpy() for k, v in bn_state(model).items() if "num_batches" not in k}
    return out


def rank_differences(case, args) -> Dict[str, float]:
    from d2_batchnorm.engine import run_on_local_workers

    r0, r1 = run_on_local_workers(_ranks_worker, args.world_size, (case, args.ranks_iters, args.ims, args.size))
    return {
        name: max(float(abs(r0[name][k] - r1[name][k]).max()) for k in r0[name])
        for name in ("fvcore", "ours")
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--iters", type=int, default=20, help="batches per method")
    p.add_argument("--short-iters", type=int, default=4,
                   help="batches of the second table (first call and model seen); 0 skips it")
    p.add_argument("--ims", type=int, default=2, help="images per batch")
    p.add_argument("--size", type=int, default=128, help="image side (pixels)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--no-readme", action="store_true", help="do not write the output into docs/benchmarks.md")
    p.add_argument("--world-size", type=int, default=2, help="processes for the rank check; 1 skips it")
    p.add_argument("--ranks-iters", type=int, default=3, help="batches per rank in the rank check")
    p.add_argument("--no-training", action="store_true",
                   help="skip the hidden-cost-in-training table (tools/bench_training.py)")
    bench_training.add_arguments(p, prefix="training-")
    p.add_argument("--floor-iters", type=int, default=100,
                   help="batches for an extra ours-vs-backbone timing (case maskrcnn_a only); "
                        "<= --iters skips it")
    args = p.parse_args(argv)
    if args.short_iters < 0 or args.short_iters > args.iters:
        print(f"error: --short-iters = {args.short_iters} must be in [0, --iters]", file=sys.stderr)
        return 2
    for name in ("iters", "ims", "size", "repeats", "threads", "world_size", "ranks_iters"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} = {getattr(args, name)} must be >= 1", file=sys.stderr)
            return 2
    try:
        training = None if args.no_training else bench_training.options(args, prefix="training-")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("d2_batchnorm").setLevel(logging.ERROR)
    options = " ".join(sys.argv[1:] if argv is None else argv) or "(defaults)"
    header_lines = [f"Machine: {machine_description(f'torch threads {torch.get_num_threads()}')}",
                    f"Command: `python tools/bench_precise_bn.py {options}`", ""]
    print(header_lines[0])
    print(f"batches: {args.iters} x {args.ims} images of {args.size}x{args.size}, training mode, "
          f"time = min over {args.repeats} interleaved repeats")
    header = ("| case | BN modules | fvcore s | ours s | adaptive s | backbone fwd s | fvcore/ours "
              "| adaptive/ours | ours/backbone "
              "| rel err mean ours (fvcore) | rel err var ours (fvcore) | max rank diff ours (fvcore) |")
    rows = [header, "|---" * 12 + "|"]
    short_header = (f"| case | over {args.short_iters} batches: fvcore s | ours first call s | ours model seen s "
                    "| backbone fwd s | fvcore/ours first | fvcore/ours seen | ours first/backbone "
                    "| ours seen/backbone |")
    short_rows = [short_header, "|---" * 9 + "|"]
    longs = []
    for case in args.cases:
        r = bench_case(case, args)
        if args.world_size > 1:
            d = rank_differences(case, args)
            diff = f"{d['ours']:.3g} ({d['fvcore']:.3g})"
        else:
            diff = "n/a"
        rows.append(_row(
            case, r["bn_modules"], f"{r['t_fvcore']:.2f}", f"{r['t_ours']:.2f}", f"{r['t_adaptive']:.2f}",
            f"{r['t_backbone']:.2f}", f"{r['t_fvcore'] / r['t_ours']:.2f}x", f"{r['t_adaptive'] / r['t_ours']:.2f}x",
            f"{r['t_ours'] / r['t_backbone']:.2f}x",
            f"{r['err_ours']['mean']:.2g} ({r['err_fvcore']['mean']:.2g})",
            f"{r['err_ours']['var']:.2g} ({r['err_fvcore']['var']:.2g})", diff,
        ))
        print(rows[-1], flush=True)
        if "s_ours" in r:
            s = {k: r[f"s_{k}"] for k in ("fvcore", "ours", "ours_seen", "backbone")}
            short_rows.append(_row(
                case, *(f"{s[k]:.2f}" for k in s), f"{s['fvcore'] / s['ours']:.2f}x",
                f"{s['fvcore'] / s['ours_seen']:.2f}x", f"{s['ours'] / s['backbone']:.2f}x",
                f"{s['ours_seen'] / s['backbone']:.2f}x",
            ))
            print(short_rows[-1], flush=True)
        if "t_ours_long" in r:
            longs.append(f"{case}: over {args.floor_iters} batches, ours {r['t_ours_long']:.2f} s, "
                         f"backbone forward {r['t_backbone_long']:.2f} s, ours/backbone "
                         f"{r['t_ours_long'] / r['t_backbone_long']:.2f}x")
            print(longs[-1], flush=True)
    print()
    tables = rows + ([""] + short_rows if len(short_rows) > 2 else []) + [""] + longs
    if training is not None:
        tables += [""] + bench_training.training_table(training)
    print("\n".join(tables))
    if not args.no_readme:
        write_section("bench_precise_bn", "\n".join(header_lines + tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
