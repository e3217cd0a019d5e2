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
import sys

from detectron2.checkpoint import DetectionCheckpointer

import d2_batchnorm  # noqa: F401  (registers datasets and models)
from d2_batchnorm.data import prepare_datasets
from d2_batchnorm.engine import BNTrainer, check_weights, launch_cli, load_config, setup
from d2_batchnorm.lazy_config import dataset_names


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


def check_before_launch(args, world_size: int):
    """
    Fails fast, in the launching process, on a bad config, a missing dataset or a file that
    is not a checkpoint (nothing is written into OUTPUT_DIR). Returns the config.
    """
    cfg = load_config(args.config_file, args.opts, world_size)
    check_weights(cfg, resume=args.resume)
    prepare_datasets(dataset_names(cfg))
    return cfg


def cli(argv=None) -> int:
    return launch_cli(main, check_before_launch, argv)


if __name__ == "__main__":
    sys.exit(cli())
