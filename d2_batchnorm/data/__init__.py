"""Datasets: the generated toy COCO-format dataset and its registration."""
from .builtin import TOY_DATASETS, prepare_datasets, register_toy_datasets
from .toy import (
    RELATIVE_BRIGHTNESS_CATEGORIES,
    TOY_CATEGORIES,
    ToyDatasetSpec,
    ensure_toy_coco,
    generate_toy_coco,
    toy_categories,
)

register_toy_datasets()
