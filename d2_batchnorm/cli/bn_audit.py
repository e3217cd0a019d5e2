"""
Audits a config's BatchNorm before training: where it will bite, why, and the fix.

    python tools/bn_audit.py --config-file configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_bn_head.yaml \
        --num-gpus 8 [--output DIR] [KEY VALUE ...]
    python tools/bn_audit.py --config-file configs/Toy/fcos_R18_FPN_syncbn_head_naive.py --num-gpus 2 [key=value ...]
    # with a trained checkpoint: also how far its statistics are from precise ones
    python tools/bn_audit.py --config-file X.yaml --num-gpus 2 MODEL.WEIGHTS model_final.pth \
        [--samples 256] [--eval]

Builds the model exactly as training would (on CPU, no weights, no training: seconds) and
prints its audit (:mod:`d2_batchnorm.audit`: one row per group of normalization modules,
then the findings, each with the paper's reason and the config line that fixes it). Writes
``bn_audit.md`` and ``bn_audit.json`` into ``--output`` (default: the config's OUTPUT_DIR).
Exits 0 without findings, 1 with findings, 2 on bad input (one ``error:`` line).

``MODEL.WEIGHTS`` (a LazyConfig: ``train.init_checkpoint=``) given on the command line also
measures, in this one process: PreciseBN
on ``--samples`` images of the PreciseBN datasets, and per group the relative L2 distance
of the checkpoint's statistics to the precise ones; with ``--eval``, the AP on
``DATASETS.TEST`` with the checkpoint's (EMA) statistics, with mini-batch statistics
(``TEST.IMS_PER_BATCH`` images per batch) and with the precise ones.
"""
import argparse
import json
import os
import sys

import d2_batchnorm  # noqa: F401  (registers datasets and models)
from d2_batchnorm.audit import audit_config
from d2_batchnorm.checks import check_int
from d2_batchnorm.config_kinds import adapt
from d2_batchnorm.engine import check_checkpoint, check_launch_args
from d2_batchnorm.experiments import box_ap


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--num-gpus", type=int, default=1, help="workers the config will train with")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--output", default="", help="folder for bn_audit.{md,json}; default: OUTPUT_DIR")
    p.add_argument("--samples", type=int, default=256, help="images for PreciseBN with MODEL.WEIGHTS")
    p.add_argument("--eval", action="store_true", help="with MODEL.WEIGHTS: AP with EMA, mini-batch and precise statistics")
    p.add_argument("opts", nargs=argparse.REMAINDER,
                   help="yacs: KEY VALUE pairs, e.g. MODEL.WEIGHTS x.pth; LazyConfig: key=value overrides")
    return p


def measure(cfg, model, audit, samples: int, evaluate: bool) -> None:
    """Fills ``audit.measured``: distances of the checkpoint's statistics to precise ones, APs."""
    from detectron2.checkpoint import DetectionCheckpointer

    from d2_batchnorm.data import prepare_datasets
    from d2_batchnorm.engine import test_any
    from d2_batchnorm.engine.precise_bn_settings import PreciseBNSettings
    from d2_batchnorm.engine.recompute import recompute_and_evaluate
    from d2_batchnorm.module_state import bn_statistics_distance
    from d2_batchnorm.precise_bn import summarize_errors

    DetectionCheckpointer(model).load(adapt(cfg).get("MODEL.WEIGHTS"))
    kind = adapt(cfg).copy()
    kind.set("TEST.PRECISE_BN.NUM_SAMPLES", samples)
    # one process here, with the batch of one worker of the audited training (at most --samples)
    kind.set("TEST.PRECISE_BN.IMS_PER_BATCH", min(PreciseBNSettings.from_config(cfg, audit.world_size).ims_per_batch, samples))
    prepare_datasets(kind.dataset_names())
    aps = {}
    if evaluate:
        model.eval()
        mini = kind.copy()
        mini.set("TEST.BN_STATS", "mini_batch")
        aps[f"mini-batch ({mini.test_images_per_worker()} img)"] = box_ap(test_any(mini.cfg, model))
    done = recompute_and_evaluate(kind.cfg, model, evaluate)
    result, before, after = done.result, done.statistics_before, done.statistics_after
    for g in audit.groups:
        prefix = tuple(f"{n}." for n in g.modules)
        keys = [k for k in after if k.startswith(prefix)]
        if keys:
            dist = bn_statistics_distance({k: before[k] for k in keys}, {k: after[k] for k in keys})
            audit.measured[f"{g.name}: checkpoint vs precise statistics (relative L2)"] = dist
        errors = {n: e for n, e in (result.errors if result is not None else {}).items() if n in g.modules}
        if errors:  # the group's max and median relative standard error of the precise statistics
            summary = summarize_errors(errors, prefix="", group_of=lambda name: g.name)
            summary = {k.strip("_/").replace(f"/{g.name}/", " "): v for k, v in summary.items() if f"/{g.name}/" in k}
            if summary:  # none below 2 units
                audit.measured[f"{g.name}: relative standard error of the precise statistics"] = summary
    if result is not None:
        audit.measured["PreciseBN"] = {"images": result.num_samples, "seconds": round(result.seconds, 1)}
    if evaluate:
        aps = {"EMA (checkpoint)": box_ap(done.before), **aps, "precise": box_ap(done.after)}
        audit.measured["bbox AP"] = aps


def cli(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        check_launch_args(args.num_gpus, args.num_machines, device=None)  # a plan for N GPUs: none needed here
        check_int("--samples", args.samples, 1)
        audit, cfg, model = audit_config(args.config_file, args.opts, args.num_gpus * args.num_machines)
        kind = adapt(cfg)
        name = kind.name("MODEL.WEIGHTS")  # MODEL.WEIGHTS or train.init_checkpoint
        weights_given = kind.given("MODEL.WEIGHTS", args.opts)
        if weights_given:
            check_checkpoint(kind.get("MODEL.WEIGHTS"), name)
        elif args.eval:
            raise ValueError(f"--eval needs a checkpoint: pass {name} on the command line")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if weights_given:
        measure(cfg, model, audit, args.samples, args.eval)
    markdown = audit.to_markdown()
    out = args.output or adapt(cfg).get("OUTPUT_DIR")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bn_audit.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(out, "bn_audit.json"), "w") as f:
        json.dump(audit.to_json(), f, indent=1, default=float)
    print(markdown)
    print(f"written: {os.path.join(out, 'bn_audit.md')} and bn_audit.json")
    return 1 if audit.findings else 0


if __name__ == "__main__":
    sys.exit(cli())
