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
from d2_batchnorm.engine import BNTrainer, launch_cli, load_config, setup


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


def cli(argv=None) -> int:
    return launch_cli(main, load_config, argv)


if __name__ == "__main__":
    sys.exit(cli())
