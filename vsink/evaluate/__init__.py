"""Evaluations: dense prediction (linear-probe segmentation, LOST, artifact metrics)."""

from .datasets import DatasetError, DenseDataset, DenseSample
from .open import open_dataset
from .dense import TASKS, DenseResult, LostSettings, evaluate_dense, supported_tasks
from .segmentation import ProbeSettings
from .variants import Variant, parse_variants

__all__ = ["TASKS", "DatasetError", "DenseDataset", "DenseResult", "DenseSample", "LostSettings", "ProbeSettings",
           "Variant", "evaluate_dense", "open_dataset", "parse_variants", "supported_tasks"]
