"""
Recomputes the precise BN population statistics of a checkpoint (optionally on another
dataset, e.g. a new test domain), evaluates before and after, and saves a new checkpoint:

    python tools/precise_bn_checkpoint.py --config-file configs/Toy/retinanet_R18_FPN_bn_head.yaml \
        --num-gpus 2 MODEL.WEIGHTS output/toy/.../model_final.pth \
        [TEST.PRECISE_BN.DATASETS "('toy_coco_shifted_train',)"] [TEST.PRECISE_BN.NUM_SAMPLES 512] \
        [MODEL.RETINANET.POPULATION_STATS shared] [KEY VALUE ...]
    python tools/precise_bn_checkpoint.py --config-file configs/Toy/retinanet_R18_FPN_bn_head.py \
        --num-gpus 2 train.init_checkpoint=output/.../model_final.pth \
        [train.precise_bn.num_samples=512] [model.head.population_stats=shared] [key=value ...]

The trailing ``KEY VALUE`` opts (a LazyConfig ``.py``: ``key=value`` overrides) go into the
config the model is built from (as with tools/train_net.py or tools/lazyconfig_train_net.py),
so a checkpoint can get the population statistics of another mode.
The statistics are computed exactly as the training hook computes them
(:class:`d2_batchnorm.engine.PreciseBN` built from the config), on all workers together, from ``TEST.PRECISE_BN.NUM_SAMPLES`` images (or ``NUM_ITER`` batches per worker)
of ``TEST.PRECISE_BN.DATASETS`` (empty: ``DATASETS.TRAIN``), ``IMS_PER_BATCH`` images per
worker per batch (fewer with ``TARGET_REL_ERROR``), and reported with the relative standard
errors of the new statistics per module group. The new checkpoint is written to ``--output`` (default:
``<OUTPUT_DIR>/model_precise_bn.pth``); a JSON of the results before/after next to it.
"""
import argparse
import json
import os
import sys

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

import d2_batchnorm  # noqa: F401  (registers datasets and models)
from d2_batchnorm.data import prepare_datasets
from d2_batchnorm.config_kinds import adapt
from d2_batchnorm.engine import build_any_model, check_checkpoint, check_launch_args, launch, load_any_config
from d2_batchnorm.engine.precise_bn_settings import PreciseBNSettings
from d2_batchnorm.engine.recompute import recompute_and_evaluate
from d2_batchnorm.precise_bn import summarize_errors


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--num-gpus", type=int, default=1, help="processes (CPU processes without CUDA)")
    p.add_argument("--dist-url", default="auto")
    p.add_argument("--output", default="", help="new checkpoint (.pth); default <OUTPUT_DIR>/model_precise_bn.pth")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluations before and after")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs, e.g. MODEL.WEIGHTS x.pth")
    return p


def main(args) -> dict:
    cfg = load_any_config(args.config_file, args.opts, comm.get_world_size())
    output_dir, weights = adapt(cfg).get("OUTPUT_DIR"), adapt(cfg).get("MODEL.WEIGHTS")
    setup_logger(output_dir, distributed_rank=comm.get_rank(), name="d2_batchnorm")
    setup_logger(output_dir, distributed_rank=comm.get_rank(), name="detectron2")
    model = build_any_model(cfg)
    DetectionCheckpointer(model).load(weights)

    summary = {"weights": weights, "datasets": statistics_datasets(cfg)}
    # the training hook's statistics, loader and random stream
    done = recompute_and_evaluate(cfg, model, evaluate=not args.no_eval)
    result = done.result
    summary.update(
        images=result.num_samples, iterations=result.num_iters, bn_modules=result.num_modules,
        seconds=round(result.seconds, 2), relative_change=done.ema_distance,
        relative_standard_errors=summarize_errors(result.errors, prefix="rel_error"),
    )
    if not args.no_eval:
        summary.update(before=done.before, after=done.after)
    if comm.is_main_process():
        path = args.output or os.path.join(output_dir, "model_precise_bn.pth")
        PathManager.mkdirs(os.path.dirname(os.path.abspath(path)))
        with PathManager.open(path, "wb") as f:
            torch.save({"model": model.state_dict(), "precise_bn": summary}, f)
        with PathManager.open(os.path.splitext(path)[0] + ".json", "w") as f:
            json.dump(summary, f, indent=2, default=float)
        print(json.dumps({k: v for k, v in summary.items() if k not in ("before", "after")}, default=float))
        for when in ("before", "after"):
            if when in summary:
                print(f"{when}: {json.dumps(_headline(summary[when]), default=float)}")
        print(f"saved {path}")
    comm.synchronize()
    return summary


def statistics_datasets(cfg) -> list:
    """The datasets PreciseBN draws from: ``TEST.PRECISE_BN.DATASETS``, else the training ones."""
    return list(PreciseBNSettings.from_config(cfg).datasets)


def _headline(results: dict) -> dict:
    """The AP-like numbers of detectron2's (possibly nested) results dict."""
    out = {}
    for task, metrics in results.items():
        if isinstance(metrics, dict):
            for k, v in metrics.items():
                if isinstance(v, dict):
                    out.update({f"{task}/{k}/{kk}": vv for kk, vv in v.items() if kk in ("AP", "AP50")})
                elif k in ("AP", "AP50"):
                    out[f"{task}/{k}"] = v
    return out


def cli(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        check_launch_args(args.num_gpus, device=None)
        cfg = load_any_config(args.config_file, args.opts, args.num_gpus)
        kind = adapt(cfg)
        check_launch_args(args.num_gpus, device=kind.get("MODEL.DEVICE"))
        weights, name = kind.get("MODEL.WEIGHTS"), kind.name("MODEL.WEIGHTS")
        if not weights:
            raise ValueError(f"{name} is empty; pass the checkpoint as {kind.fix(('MODEL.WEIGHTS', 'path.pth'))}")
        check_checkpoint(weights, name)
        prepare_datasets(kind.test_datasets() + statistics_datasets(cfg))
        launch(main, args.num_gpus, dist_url=args.dist_url, args=(args,), device=kind.get("MODEL.DEVICE"))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
