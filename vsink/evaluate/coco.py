"""COCO instance annotations as the hallucination metrics need them: image files and the set of
object classes in each image."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from ..errors import VsinkError


@dataclass
class CocoObjects:
    files: dict[int, str]  # image id -> file name
    objects: dict[int, set[str]]  # image id -> class names present (images without objects: empty)
    classes: list[str]  # every category name, sorted
    where: str  # the file, for messages


def read_coco_objects(annotations: Union[str, os.PathLike, dict]) -> CocoObjects:
    """Read a COCO instances file (or its parsed dict); errors name the file."""
    where = "instances JSON" if isinstance(annotations, dict) else str(annotations)
    try:
        data = annotations if isinstance(annotations, dict) else json.loads(Path(annotations).read_text())
        names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        files = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        objects: dict[int, set[str]] = {i: set() for i in files}
        for i, ann in enumerate(data["annotations"]):
            image, cat = int(ann["image_id"]), int(ann["category_id"])
            if image not in files or cat not in names:
                raise VsinkError(f"{where}: annotations[{i}] refers to an unknown image or category")
            objects[image].add(names[cat])
    except OSError as e:
        raise VsinkError(f"{where}: cannot read ({e.strerror or e})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise VsinkError(f"{where}: not a COCO instances file (categories, images, annotations needed; {e!r})") from None
    return CocoObjects(files, objects, sorted(set(names.values())), where)
