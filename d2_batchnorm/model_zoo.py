"""
``get_config``: detectron2's ``model_zoo.get_config`` over this repository's ``configs/``
first, so a LazyConfig written for detectron2 runs on d2_batchnorm's modules with its import
changed (``from d2_batchnorm.model_zoo import get_config``).

``get_config("common/models/retinanet.py")`` is ours (``BNRetinaNet``, ``BNRetinaNetHead``);
``common/models/fcos.py``, ``common/models/mask_rcnn_fpn.py`` (``BNConvFCHead``,
``BNMaskRCNNConvUpsampleHead``) and ``common/train.py`` (detectron2's ``train`` plus our
settings) too; any path this repository does not have (``common/data/coco.py``,
``common/optim.py``, ``common/coco_schedule.py``, ...) is detectron2's.
"""
import os

__all__ = ["CONFIG_DIR", "get_config", "get_config_file"]

#: the configs shipped with the package (package data; ``configs/`` in the checkout links here)
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def get_config_file(config_path: str) -> str:
    """The file of ``config_path`` (relative to ``configs/``): ours if we have it, else detectron2's."""
    ours = os.path.join(CONFIG_DIR, config_path)
    if os.path.isfile(ours):
        return ours
    from detectron2.model_zoo import get_config_file as d2_get_config_file

    return d2_get_config_file(config_path)


def get_config(config_path: str, trained: bool = False):
    """
    :func:`get_config_file`'s config, loaded as detectron2's ``model_zoo.get_config`` loads
    it (a yacs config for ``.yaml``, with d2_batchnorm's keys; a LazyConfig for ``.py``).
    ``trained`` is detectron2's (its model zoo weights), for detectron2's configs only.
    """
    from .config_kinds import config_kind

    path = get_config_file(config_path)
    if not path.startswith(CONFIG_DIR):
        from detectron2.model_zoo import get_config as d2_get_config

        return d2_get_config(config_path, trained)
    return config_kind(path).read(path)
