"""
d2_batchnorm: correct, consistent and measurable BatchNorm for Detectron2.

Importing it registers the toy datasets and d2_batchnorm's models with detectron2's
registries. Public API:

* :func:`add_batchnorm_config`, :func:`validate_batchnorm_config` — config keys;
* :mod:`d2_batchnorm.engine` — ``BNTrainer``, ``launch``, hooks;
* :func:`convert_for_inference` — standard norms for export; :mod:`d2_batchnorm.export`
  scripts or traces a trained model (``tools/export_model.py``);
* :mod:`d2_batchnorm.layers`, :mod:`d2_batchnorm.modeling`, :mod:`d2_batchnorm.data`.
"""
try:
    import detectron2  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without detectron2
    raise ImportError(
        "d2_batchnorm needs detectron2, which is not on PyPI under its own name. Install it "
        "with one of:\n"
        "  * bash tools/bootstrap_env.sh   (this repository's set-up: a venv with torch, "
        "PyPI's sal-detectron2==0.7.2 and the other dependencies)\n"
        "  * pip install 'git+https://github.com/facebookresearch/detectron2.git'\n"
        "  * see https://detectron2.readthedocs.io/en/latest/tutorials/install.html"
    ) from e

from . import data  # noqa: F401  (registers the toy datasets)
from . import modeling  # noqa: F401  (registers our models)
from .config import add_batchnorm_config, validate_batchnorm_config
from .layers import convert_for_inference
from .precise_bn import update_bn_stats

__version__ = "0.1.0"
__all__ = ["add_batchnorm_config", "validate_batchnorm_config", "update_bn_stats", "convert_for_inference"]
