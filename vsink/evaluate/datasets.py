"""Dense-evaluation datasets: Pascal VOC, ADE20k, COCO instances, a folder of image/mask pairs.

Every reader returns a :class:`DenseDataset` of :class:`DenseSample`. Opening a dataset checks its
structure (directories, split lists, annotation JSON) and raises :class:`DatasetError` naming the
path; each sample's files are read on :meth:`DenseSample.load`, which raises a
:class:`DatasetError` naming the file, so a batch run can skip and report a bad item.

Masks are ``uint8`` class indices with 255 = ignore; boxes are ``float64 [K, 4]`` pixel
coordinates ``(x0, y0, x1, y1)`` with exclusive ends (a box covering a whole W×H image is
``(0, 0, W, H)``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
from PIL import Image

from ..errors import VsinkError
from ..images import IMAGE_SUFFIXES, load_image
from ..options import RELATIVE_FILE, AnyOf, Bool, Float, Int, Invalid, ListOf, Text
from ..readers import ReadError, checked_field, read_json, read_lines, read_xml, records

IGNORE_INDEX = 255
FORMATS = ("voc", "ade", "coco", "folder", "synthetic")

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")

PathLike = Union[str, os.PathLike]

#: a box coordinate; a COCO ``bbox`` [x, y, w, h]
COORD = Float()
BBOX = ListOf(Float(), length=4)


class DatasetError(VsinkError):
    """A dataset, split list, annotation or mask that cannot be used; the message names the file."""


@dataclass
class Loaded:
    """One sample read from disk (or generated)."""

    image: Image.Image
    mask: Optional[np.ndarray]
    boxes: Optional[np.ndarray]


@dataclass
class DenseSample:
    """One item: an id and how to read its image, mask and boxes."""

    id: str
    image: Union[Path, Image.Image]
    mask: Union[None, Path, np.ndarray] = None
    boxes: Union[None, np.ndarray, Callable[[], np.ndarray]] = None
    reduce_zero_label: bool = False

    def load(self) -> Loaded:
        """Read the image (RGB), mask and boxes; :class:`DatasetError` names a bad file."""
        image = self.image if isinstance(self.image, Image.Image) else _read_image(self.image)
        mask = None
        if self.mask is not None:
            mask = self.mask if isinstance(self.mask, np.ndarray) else read_mask(self.mask, self.reduce_zero_label)
            if mask.shape != (image.height, image.width):
                where = self.mask if isinstance(self.mask, Path) else self.id
                raise DatasetError(f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                                   f"{image.width}x{image.height}")
        boxes = self.boxes() if callable(self.boxes) else self.boxes
        return Loaded(image=image, mask=mask, boxes=boxes)

    def __repr__(self) -> str:
        parts = ", ".join(f"{name}={_short(getattr(self, name))}" for name in ("image", "mask", "boxes"))
        return f"DenseSample({self.id!r}, {parts})"


def _short(value: object) -> str:
    """A sample's image, mask or boxes in a few words: a path, a shape, never the pixels."""
    if isinstance(value, np.ndarray):
        return f"array{list(value.shape)}"
    if isinstance(value, Image.Image):
        return f"<image {value.width}x{value.height}>"
    if callable(value):
        return "<read on load>"
    return repr(str(value)) if isinstance(value, Path) else repr(value)


@dataclass
class DenseDataset:
    """A list of samples plus what is known about the labels."""

    name: str
    format: str
    split: str
    samples: list[DenseSample]
    num_classes: Optional[int] = None
    class_names: Optional[list[str]] = None
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"DenseDataset({self.name!r}, format={self.format!r}, split={self.split!r}, {len(self)} items)"

    def __getitem__(self, i: int) -> DenseSample:
        return self.samples[i]

    @property
    def has_masks(self) -> bool:
        return any(s.mask is not None for s in self.samples)

    @property
    def has_boxes(self) -> bool:
        return any(s.boxes is not None for s in self.samples)

    def limit(self, n: Optional[int]) -> "DenseDataset":
        """The first ``n`` samples (all if ``n`` is None)."""
        if n is None:
            return self
        if n < 1:
            raise DatasetError(f"limit must be at least 1, got {n}")
        return DenseDataset(self.name, self.format, self.split, self.samples[:n], self.num_classes,
                            self.class_names, dict(self.info))

    def describe(self) -> str:
        parts = [f"{self.name} [{self.format}] split {self.split!r}: {len(self)} images"]
        parts.append("masks" if self.has_masks else "no masks")
        parts.append("boxes" if self.has_boxes else "no boxes")
        if self.num_classes:
            parts.append(f"{self.num_classes} classes")
        return ", ".join(parts)


def _read_image(path: Path) -> Image.Image:
    try:
        return load_image(path)
    except VsinkError as e:
        raise DatasetError(str(e)) from None


def read_mask(path: PathLike, reduce_zero_label: bool = False) -> np.ndarray:
    """A label PNG (palette or greyscale) → ``uint8 [H, W]`` class indices.

    ``reduce_zero_label`` (ADE20k): 0 ("other") becomes 255 and every other label shifts down by one.
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"{p}: mask file not found")
    try:
        with Image.open(p) as img:
            img.load()
            if img.mode not in ("P", "L"):
                raise DatasetError(f"{p}: mask must be a palette or greyscale PNG of class indices, "
                                   f"got mode {img.mode}")
            mask = np.array(img, dtype=np.uint8)
    except DatasetError:
        raise
    except Exception as e:  # PIL raises many types for bad files
        raise DatasetError(f"{p}: unreadable mask ({e})") from None
    if reduce_zero_label:
        mask = mask.astype(np.int16) - 1
        mask[mask < 0] = IGNORE_INDEX
        mask[mask == IGNORE_INDEX - 1] = IGNORE_INDEX
        mask = mask.astype(np.uint8)
    return mask


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path}: {what} directory not found")
    return path


#: an id of a split list: a file stem, never a path
SAMPLE_ID = r"(?!\.\.?$)[^/\\\x00]+"


def _split_list(path: Path) -> list[str]:
    """Ids of a split list (first word of each line); each a file stem, not a path."""
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.txt")) if path.parent.is_dir() else []
        hint = f"; available: {', '.join(available)}" if available else ""
        raise DatasetError(f"{path}: split list not found{hint}")
    try:
        lines = read_lines(path)
    except ReadError as e:
        raise DatasetError(str(e)) from None
    ids = []
    for n, line in lines:
        sid = line.split()[0]
        if not re.fullmatch(SAMPLE_ID, sid):
            raise DatasetError(f"{path}:{n}: {sid!r} is not an image id (a file name without folders)")
        ids.append(sid)
    if not ids:
        raise DatasetError(f"{path}: split list is empty")
    return ids


def read_voc_boxes(path: PathLike, *, include_difficult: bool = True) -> np.ndarray:
    """Boxes of a VOC annotation XML. VOC's 1-based inclusive pixel indices become exclusive-end
    coordinates (``xmin - 1, ymin - 1, xmax, ymax``), as LOST reads them."""
    p = Path(path)
    try:
        root = read_xml(p)
    except ReadError as e:
        raise DatasetError(str(e)) from None
    boxes = []
    for obj in root.iter("object"):
        if not include_difficult and (obj.findtext("difficult") or "0").strip() == "1":
            continue
        bb = obj.find("bndbox")
        try:
            x0, y0, x1, y1 = (COORD.from_text(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore[union-attr, arg-type]
        except (AttributeError, TypeError, Invalid):
            raise DatasetError(f"{p}: object without a finite numeric bndbox (xmin, ymin, xmax, ymax)") from None
        if x1 < x0 or y1 < y0:
            raise DatasetError(f"{p}: box ({x0}, {y0}, {x1}, {y1}) has max < min")
        boxes.append((x0 - 1, y0 - 1, x1, y1))
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def read_voc(root: PathLike, split: str = "val", *, image_set: str = "auto",
             include_difficult: bool = True) -> DenseDataset:
    """Pascal VOC (``JPEGImages/``, ``SegmentationClass/``, ``Annotations/``, ``ImageSets/``).

    ``image_set``: ``segmentation`` (ids from ``ImageSets/Segmentation/<split>.txt``), ``main``
    (``ImageSets/Main/<split>.txt``, e.g. VOC07 trainval for LOST) or ``auto`` (segmentation when
    that list exists). Each sample gets the mask and/or boxes that exist for its id.
    """
    root = Path(root)
    _require_dir(root, "VOC root")
    images = _require_dir(root / "JPEGImages", "VOC JPEGImages")
    if image_set not in ("auto", "segmentation", "main"):
        raise DatasetError(f"image_set must be auto, segmentation or main, got {image_set!r}")
    seg_list = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    main_list = root / "ImageSets" / "Main" / f"{split}.txt"
    if image_set == "auto":
        if not (seg_list.is_file() or main_list.is_file()):
            available = sorted({p.stem for p in (root / "ImageSets").glob("*/*.txt")})
            raise DatasetError(f"{seg_list} and {main_list}: split list not found"
                               + (f"; available: {', '.join(available)}" if available else ""))
        image_set = "segmentation" if seg_list.is_file() else "main"
    list_path = seg_list if image_set == "segmentation" else main_list
    samples = []
    for sid in _split_list(list_path):
        img = images / f"{sid}.jpg"
        if not img.is_file():
            found = [p for p in images.glob(f"{sid}.*") if p.suffix.lower() in IMAGE_SUFFIXES]
            img = found[0] if found else img
        mask = root / "SegmentationClass" / f"{sid}.png"
        xml = root / "Annotations" / f"{sid}.xml"
        boxes = (lambda x=xml: read_voc_boxes(x, include_difficult=include_difficult)) if xml.is_file() else None
        samples.append(DenseSample(sid, img, mask if mask.is_file() else None, boxes))
    return DenseDataset(root.name, "voc", split, samples, num_classes=len(VOC_CLASSES),
                        class_names=list(VOC_CLASSES), info={"image_set": image_set, "list": str(list_path)})


def _pairs(images: Path, masks: Path, what: str) -> list[tuple[Path, Path]]:
    """Every image file with its ``NAME.png`` mask; a missing mask is an error naming it."""
    files = sorted(p for p in images.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"{images}: no image files")
    pairs = [(f, masks / f"{f.stem}.png") for f in files]
    for img, mask in pairs:
        if not mask.is_file():
            raise DatasetError(f"{mask}: {what} missing for {img.name}")
    return pairs


def read_ade(root: PathLike, split: str = "validation", *, reduce_zero_label: bool = True) -> DenseDataset:
    """ADE20k (``images/<split>/*.jpg``, ``annotations/<split>/*.png``); 150 classes with
    ``reduce_zero_label`` (label 0 = "other" is ignored)."""
    root = Path(root)
    images = _require_dir(root / "images" / split, "ADE20k images")
    masks = _require_dir(root / "annotations" / split, "ADE20k annotations")
    samples = [DenseSample(img.stem, img, mask, None, reduce_zero_label)
               for img, mask in _pairs(images, masks, "annotation")]
    return DenseDataset(root.name, "ade", split, samples, num_classes=150 if reduce_zero_label else 151,
                        info={"reduce_zero_label": reduce_zero_label})


def read_folder(root: PathLike, split: Optional[str] = None) -> DenseDataset:
    """A folder of image/mask pairs: ``images/[<split>/]NAME.*`` and ``masks/[<split>/]NAME.png``
    (class indices, 255 = ignore). The number of classes is inferred from the masks unless given."""
    root = Path(root)
    sub = Path(split) if split else Path()
    images = _require_dir(root / "images" / sub, "images")
    masks = _require_dir(root / "masks" / sub, "masks")
    samples = [DenseSample(img.stem, img, mask) for img, mask in _pairs(images, masks, "mask")]
    return DenseDataset(root.name, "folder", split or "all", samples, info={"flat": split is None})


def read_coco(annotations: PathLike, images: Optional[PathLike] = None, *,
              include_crowd: bool = False) -> DenseDataset:
    """COCO instances JSON: boxes per image (``bbox`` = x, y, w, h → x0, y0, x1, y1). Images
    without a (non-crowd) box are left out. Masks are not read (no well-kept offline RLE/polygon
    decoder is among vsink's dependencies); use COCO for LOST and the box-based artifact metrics.

    ``images`` defaults to the directory next to the JSON named like its ``instances_<split>``.
    """
    path = Path(annotations)
    if not path.is_file():
        raise DatasetError(f"{path}: COCO annotation file not found")
    try:
        data = read_json(path, "COCO instances file")
        files = {checked_field(im, "id", Int(min=0), at): checked_field(im, "file_name", RELATIVE_FILE, at)
                 for at, im in records(data, "images", str(path))}
        boxes: dict[int, list[tuple[float, float, float, float]]] = {}
        for at, ann in records(data, "annotations", str(path)):
            if checked_field(ann, "iscrowd", AnyOf((Bool(), Int(0, 1))), at, 0) and not include_crowd:
                continue
            x, y, w, h = checked_field(ann, "bbox", BBOX, at)
            image_id = checked_field(ann, "image_id", Int(min=0), at)
            if image_id not in files:
                raise DatasetError(f"{at} refers to unknown image_id {image_id}")
            if w < 0 or h < 0:
                raise DatasetError(f"{at} has a negative box size")
            boxes.setdefault(image_id, []).append((x, y, x + w, y + h))
        categories = [(checked_field(c, "id", Int(min=0), at), checked_field(c, "name", Text(), at, None))
                      for at, c in records(data, "categories", str(path), required=False)]
    except ReadError as e:
        raise DatasetError(str(e)) from None
    if images is None:
        split = path.stem.split("_", 1)[-1]
        images = path.parent.parent / split
    image_dir = _require_dir(Path(images), "COCO images")
    samples = [DenseSample(Path(files[i]).stem, image_dir / files[i], None, np.asarray(b, dtype=np.float64))
               for i, b in sorted(boxes.items())]
    if not samples:
        raise DatasetError(f"{path}: no image has a box")
    return DenseDataset(path.stem, "coco", path.stem, samples,
                        class_names=[name if name is not None else str(cid) for cid, name in categories] or None,
                        info={"images": str(image_dir), "include_crowd": include_crowd})
