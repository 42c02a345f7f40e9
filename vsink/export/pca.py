"""The register papers' standard figure: the first three principal components of an image's
patch features shown as RGB, per block, for one or more runs (before / after a fix).

The PCA is fitted per image and per run (as in Darcet et al. 2024): each panel shows how that
model's features of that image vary. Each component is oriented so that its largest projection
is positive and scaled to [0, 1] between its 1st and 99th percentile, so a few high-norm
artifact tokens show as saturated dots instead of washing out the rest.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from ..backbones.base import Backbone
from ..features import FeatureCapture, FeatureSpec
from .figures import plain_text, plt


def pca_rgb(features: np.ndarray) -> np.ndarray:
    """Patch features [h, w, D] → RGB [h, w, 3] in [0, 1] (see the module docstring)."""
    h, w, d = features.shape
    x = features.reshape(h * w, d).astype(np.float64)
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    proj = x @ vt[:3].T  # [P, <=3]
    for c in range(proj.shape[1]):
        if proj[np.abs(proj[:, c]).argmax(), c] < 0:
            proj[:, c] = -proj[:, c]
        lo, hi = np.percentile(proj[:, c], [1, 99])
        proj[:, c] = np.clip((proj[:, c] - lo) / (hi - lo), 0, 1) if hi > lo else 0.5
    rgb = np.zeros((h * w, 3))
    rgb[:, : proj.shape[1]] = proj
    return rgb.reshape(h, w, 3)


@torch.no_grad()
def patch_features(backbone: Backbone, images: Sequence[Image.Image], layers: Sequence[int],
                   size: tuple[int, int]) -> dict[int, np.ndarray]:
    """``{block: [images, h, w, D]}``: each block's output tokens on the patch grid, through the
    model's final norm (one forward pass for all blocks)."""
    specs = [FeatureSpec(layer) for layer in layers]
    with FeatureCapture(backbone, specs) as capture:
        backbone.forward(backbone.preprocess(list(images), size))
        found = capture.pop()
    return {spec.resolve(backbone.num_layers).layer: found[spec].float().cpu().numpy() for spec in specs}


@plain_text
def pca_figure(images: Sequence[Image.Image], runs: Mapping[str, Mapping[int, np.ndarray]], title: str):
    """Rows: images; columns: the input, then for each block each run's PCA-RGB panel."""
    layers = list(next(iter(runs.values())))
    cols = 1 + len(layers) * len(runs)
    fig, axes = plt.subplots(len(images), cols, figsize=(1.7 * cols, 1.8 * len(images) + 0.3), squeeze=False)
    for i, image in enumerate(images):
        axes[i][0].imshow(image)
        axes[i][0].set_title("input" if i == 0 else "", fontsize=7)
        c = 1
        for layer in layers:
            for label, feats in runs.items():
                axes[i][c].imshow(pca_rgb(feats[layer][i]), interpolation="nearest")
                if i == 0:
                    axes[i][c].set_title(f"{label}, block {layer}", fontsize=7)
                c += 1
        for ax in axes[i]:
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
