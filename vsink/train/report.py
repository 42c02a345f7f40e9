"""``OUT/report.html`` of a fine-tuning run: the training curves of ``metrics.jsonl`` and, for
recipes that start from a model (posthoc), that model and the fine-tuned one scanned side by side
on the held-out images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..export.compare import MAX_IMAGES, comparison_sections, pca_layers
from ..export.pca import patch_features
from ..export.training import render_training_report
from ..scan import scan
from .loop import TrainTask


@torch.no_grad()
def finetune_report(out: Path, summary: dict[str, Any], task: TrainTask) -> str:
    """The report page (see the module docstring)."""
    models = task.compared_models()
    images = task.held_out_images()
    sections: list[str] = []
    if models and images:
        runs = {label: scan(b, images, progress=False, report_images=MAX_IMAGES) for label, b in models.items()}
        first = next(iter(runs.values()))
        shown, blocks = first.thumbnails, pca_layers(first)
        pca = {label: patch_features(b, shown, blocks, first.input_size) for label, b in models.items()}
        sections = comparison_sections(runs, pca, shown)
    return render_training_report(out, summary, sections)
