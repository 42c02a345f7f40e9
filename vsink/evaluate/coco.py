"""COCO instance annotations as the hallucination metrics need them: image files and the set of
object classes in each image."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Union

from ..errors import VsinkError
from ..options import RELATIVE_FILE, Int, Text
from ..readers import checked_field, read_json, records

#: COCO image and category ids
ID = Int(min=0)


@dataclass
class CocoObjects:
    files: dict[int, str]  # image id -> file name
    objects: dict[int, set[str]]  # image id -> class names present (images without objects: empty)
    classes: list[str]  # every category name, sorted
    where: str  # the file, for messages


def read_coco_objects(annotations: Union[str, os.PathLike, dict]) -> CocoObjects:
    """Read a COCO instances file (or its parsed dict); every problem is an error naming the file
    and the entry (``categories[i]``, ``images[i]``, ``annotations[i]``) and field."""
    where = "instances JSON" if isinstance(annotations, dict) else str(annotations)
    data = annotations if isinstance(annotations, dict) else read_json(annotations, "COCO instances file")
    names = {checked_field(c, "id", ID, at): checked_field(c, "name", Text(), at)
             for at, c in records(data, "categories", where)}
    files = {checked_field(im, "id", ID, at): checked_field(im, "file_name", RELATIVE_FILE, at)
             for at, im in records(data, "images", where)}
    objects: dict[int, set[str]] = {i: set() for i in files}
    for at, ann in records(data, "annotations", where):
        image, cat = checked_field(ann, "image_id", ID, at), checked_field(ann, "category_id", ID, at)
        if image not in files or cat not in names:
            raise VsinkError(f"{at} refers to an unknown image or category")
        objects[image].add(names[cat])
    return CocoObjects(files, objects, sorted(set(names.values())), where)
