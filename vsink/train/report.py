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
        runs, pca = {}, {}
        for label, backbone, edits in models:
            with edits():
                runs[label] = scan(backbone, images, progress=False, report_images=MAX_IMAGES)
                if len(runs) == 1:
                    shown, blocks = runs[label].thumbnails, pca_layers(runs[label])
                pca[label] = patch_features(backbone, shown, blocks, runs[label].input_size)
        sections = comparison_sections(runs, pca, shown)
    return render_training_report(out, summary, sections, [label for label, _, _ in models])
