"""The bundled demo images: scikit-learn's two sample photographs (shipped in its wheel, no download)."""

from __future__ import annotations

from ..images import NamedImage


def demo_images() -> list[NamedImage]:
    """``china.jpg`` (large flat sky) and ``flower.jpg`` from ``sklearn.datasets.load_sample_images``."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    return [NamedImage(f"sklearn:{name.rsplit('/', 1)[-1]}", Image.fromarray(arr))
            for name, arr in zip(data.filenames, data.images)]
