"""
Trains and evaluates a model from a LazyConfig (a detectron2 Python config) with
d2_batchnorm's hooks, with detectron2's command-line conventions:

    python tools/lazyconfig_train_net.py --config-file configs/Toy/retinanet_R18_FPN_bn_head.py \\
        --num-gpus 2 [--eval-only] [--resume] [key=value ...]

The config defines ``model``, ``dataloader``, ``optimizer``, ``lr_multiplier`` and
``train``; d2_batchnorm's settings (PreciseBN, inference statistics, FrozenBN late, EMA
momentum) live in ``train`` (docs/getting-started.md, "LazyConfig"). Launching, CPU processes over gloo,
torchrun and the checks before any worker starts are those of tools/train_net.py: a bad
value ends the run with one ``error:`` line naming its config path.
"""
import sys

from detectron2.checkpoint import DetectionCheckpointer

import d2_batchnorm  # noqa: F401  (registers datasets and models)
from d2_batchnorm.engine import (
    build_lazy_model,
    build_lazy_trainer,
    create_ddp_model,
    launch_cli,
    lazy_test,
    load_lazy_config,
    setup_lazy,
)


def main(args):
    cfg = setup_lazy(args)
    if args.eval_only:
        model = build_lazy_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.train.output_dir).resume_or_load(
            cfg.train.init_checkpoint, resume=args.resume
        )
        return lazy_test(cfg, create_ddp_model(model))
    trainer = build_lazy_trainer(cfg)
    trainer.checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # a checkpoint holds the iteration that just finished: start at the next one
    start_iter = trainer.iter + 1 if args.resume and trainer.checkpointer.has_checkpoint() else 0
    return trainer.train(start_iter, cfg.train.max_iter)


def cli(argv=None) -> int:
    return launch_cli(main, load_lazy_config, argv)


if __name__ == "__main__":
    sys.exit(cli())
