#!/usr/bin/env python
"""
Trains and evaluates a detectron2 model with d2_batchnorm's trainer, with detectron2's
command-line conventions:

    python tools/train_net.py --config-file configs/Toy/retinanet_R18_FPN_bn_head.yaml \
        --num-gpus 2 [--eval-only] [--resume] [KEY VALUE ...]

On a machine without CUDA, ``--num-gpus N`` starts N CPU processes over gloo. Also runs
under ``torchrun --nproc-per-node N tools/train_net.py ...``. The config, the datasets and
``--num-gpus`` and ``MODEL.WEIGHTS`` are checked before any worker starts.
"""
import os
import sys

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser

import d2_batchnorm  # noqa: F401  (registers datasets and models)
from d2_batchnorm.data import prepare_datasets
from d2_batchnorm.engine import (
    BNTrainer,
    check_launch_args,
    check_weights,
    launch,
    launched_by_torchrun,
    load_config,
    setup,
)


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = BNTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return BNTrainer.test(cfg, model)
    trainer = BNTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def check_before_launch(args) -> None:
    """
    Fails fast, in the launching process, on a bad config, a missing dataset or a file that
    is not a checkpoint (nothing is written into OUTPUT_DIR).
    """
    if launched_by_torchrun():  # the environment gives the workers
        world_size = int(os.environ["WORLD_SIZE"])
    else:
        check_launch_args(args.num_gpus, args.num_machines)
        world_size = args.num_gpus * args.num_machines
    cfg = load_config(args.config_file, args.opts, world_size)
    check_weights(cfg, resume=args.resume)
    prepare_datasets(
        list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST) + list(cfg.TEST.PRECISE_BN.DATASETS)
    )


def cli(argv=None) -> int:
    parser = default_argument_parser()
    args = parser.parse_args(argv)
    if args.dist_url == parser.get_default("dist_url") and args.num_machines == 1:
        # detectron2's default is one fixed port per user: two jobs at once would collide
        args.dist_url = "auto"
    print("Command Line Args:", args)
    try:  # under torchrun every process checks; dataset generation is safe to race
        check_before_launch(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
