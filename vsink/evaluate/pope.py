"""POPE (Li et al. 2023): yes/no object-existence questions built from COCO instance annotations,
answers parsed and scored exactly as defined, offline.

Questions: images with at least 3 distinct object classes; per image 3 "yes" questions (present
classes) and, per split, 3 "no" questions — ``random`` (uniform over absent classes), ``popular``
(the absent classes present in the most images of the chosen set), ``adversarial`` (the absent
classes that co-occur most often with the image's classes, over the chosen set); absent = every
category of the file the image does not contain. Template:
"Is there a/an {object} in the image?". Seeded and deterministic (ties broken by class name).

Parsers:
* ``official`` — text before the first ".", commas removed, split on spaces; "no" if the words
  contain ``No``, ``no`` or ``not``, else "yes" (so an empty answer counts as yes);
* ``strict`` — the first word (letters only, lowercased) must be "yes" or "no"; anything else is
  unparseable, reported, and counted as a wrong answer that is not a "yes".

Metrics ("yes" positive): accuracy = correct / n; precision = TP / (TP + FP); recall = TP / (TP + FN);
F1; yes_ratio = "yes" predictions / n (of the predictions, not the labels); 0 where a
denominator is 0. ``mean`` averages each metric over the splits.
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter
from typing import Any, Iterable, Optional, Sequence, Union

from ..errors import VsinkError
from ..io import read_jsonl
from ..options import AnyOf, Choice, Int, Text
from .coco import read_coco_objects

SPLITS = ("random", "popular", "adversarial")
PARSERS = ("official", "strict")
FIELDS = ("question_id", "image", "object", "split", "label", "text")
QUESTION_ID = AnyOf((Int(), Text()))
LABEL = Choice(("yes", "no"))
#: the kinds of the fields of questions and answers files
FIELD_KINDS = {"question_id": QUESTION_ID, "image": Text(), "object": Text(), "split": Text(), "label": LABEL,
               "text": Text(), "answer": Text()}


def read_questions(path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """A questions JSONL (:data:`FIELDS` on every line, each ``question_id`` once)."""
    return read_jsonl(path, FIELDS, fields=FIELD_KINDS, unique="question_id")


def read_answers(path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """An answers JSONL to score: ``split``, ``label`` (yes/no) and ``answer`` (text) on every line;
    a ``question_id``, where given, appears once (a repeated one would be scored twice; ``1`` and
    ``"1"`` are the same id)."""
    return read_jsonl(path, ("split", "label", "answer"), fields=FIELD_KINDS, unique="question_id")


def question_text(obj: str) -> str:
    article = "an" if obj[:1].lower() in "aeiou" else "a"
    return f"Is there {article} {obj} in the image?"


def build_questions(annotations: Union[str, os.PathLike, dict], *, splits: Sequence[str] = SPLITS,
                    num_images: int = 500, per_image: int = 3, min_objects: int = 3,
                    seed: int = 0) -> list[dict[str, Any]]:
    """POPE questions (see the module docstring) as dicts with :data:`FIELDS`."""
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise VsinkError(f"unknown POPE split(s) {bad}; splits are {', '.join(SPLITS)}")
    coco = read_coco_objects(annotations)
    files, objects, classes, where = coco.files, coco.objects, coco.classes, coco.where
    eligible = sorted(i for i, objs in objects.items() if len(objs) >= max(min_objects, per_image))
    if not eligible:
        raise VsinkError(f"{where}: no image has {max(min_objects, per_image)} or more object classes")
    rng = random.Random(seed)
    chosen = sorted(rng.sample(eligible, min(num_images, len(eligible))))
    frequency = Counter(c for i in chosen for c in objects[i])
    pairs = Counter((a, b) for i in chosen for a in objects[i] for b in objects[i] if a != b)
    questions = []
    for split in splits:
        split_rng = random.Random(f"{seed}-{split}")
        for image in chosen:
            present = sorted(objects[image])
            absent = [c for c in classes if c not in objects[image]]
            if len(absent) < per_image:
                raise VsinkError(f"{where}: image {files[image]} leaves fewer than {per_image} absent classes")
            yes = split_rng.sample(present, per_image)
            if split == "random":
                no = split_rng.sample(absent, per_image)
            elif split == "popular":
                no = sorted(absent, key=lambda c: (-frequency[c], c))[:per_image]
            else:
                no = sorted(absent, key=lambda c: (-sum(pairs[(p, c)] for p in present), c))[:per_image]
            for obj, label in [(o, "yes") for o in yes] + [(o, "no") for o in no]:
                questions.append({"question_id": len(questions), "image": files[image], "object": obj,
                                  "split": split, "label": label, "text": question_text(obj)})
    return questions


def parse_answer(text: Optional[str], parser: str = "official") -> Optional[str]:
    """"yes", "no", or None (``strict`` only: not a clear yes/no)."""
    text = text or ""
    if parser == "official":
        words = text.split(".")[0].replace(",", "").split(" ")
        return "no" if any(w in ("No", "no", "not") for w in words) else "yes"
    if parser == "strict":
        first = re.sub(r"[^a-z]", "", (text.strip().split() or [""])[0].lower())
        return first if first in ("yes", "no") else None
    raise VsinkError(f"unknown parser {parser!r}; parsers are {', '.join(PARSERS)}")


def _metrics(labels: list[str], preds: list[Optional[str]]) -> dict[str, Any]:
    tp = sum(lab == "yes" and p == "yes" for lab, p in zip(labels, preds))
    tn = sum(lab == "no" and p == "no" for lab, p in zip(labels, preds))
    fp = sum(lab == "no" and p == "yes" for lab, p in zip(labels, preds))
    fn = sum(lab == "yes" and p != "yes" for lab, p in zip(labels, preds))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": sum(p == "yes" for p in preds) / n if n else 0.0,
            "unparseable": sum(p is None for p in preds), "n": n}


def score_answers(answers: Iterable[dict[str, Any]], parser: str = "official") -> dict[str, Any]:
    """``{"parser", "splits": {split: metrics}, "mean": metrics averaged over splits, "items"}``;
    ``items`` lists each answer as scored (``question_id``, or its position where the file has
    none; ``image`` where given; ``split``, ``label`` and the ``parsed`` answer), which the
    intervals and paired tests of :mod:`vsink.evaluate.hallucination_stats` resample. A
    ``question_id`` given twice is an error: no question is scored twice."""
    by_split: dict[str, tuple[list[str], list[Optional[str]]]] = {}
    items: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for i, a in enumerate(answers):
        try:
            split, label, text = a["split"], a["label"], a["answer"]
        except (KeyError, TypeError):
            raise VsinkError(f"answer {i}: needs split, label and answer fields") from None
        if "question_id" in a:
            qid = str(a["question_id"])
            if qid in seen:
                raise VsinkError(f"answer {i}: question_id {qid} was answered before (answer {seen[qid]}); "
                                 "each question is scored once")
            seen[qid] = i
        if label not in ("yes", "no"):
            raise VsinkError(f"answer {i}: label must be yes or no, got {label!r}")
        if text is not None and not isinstance(text, str):
            raise VsinkError(f"answer {i}: the answer must be text, got {text!r}")
        labels, preds = by_split.setdefault(split, ([], []))
        labels.append(label)
        preds.append(parse_answer(text, parser))
        items.append({"question_id": a.get("question_id", i), "image": a.get("image"), "split": split,
                      "label": label, "parsed": preds[-1]})
    if not by_split:
        raise VsinkError("no answers to score")
    splits = {s: _metrics(*v) for s, v in sorted(by_split.items())}
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    mean = {k: sum(m[k] for m in splits.values()) / len(splits) for k in keys}
    mean["unparseable"] = sum(m["unparseable"] for m in splits.values())
    mean["n"] = sum(m["n"] for m in splits.values())
    return {"parser": parser, "splits": splits, "mean": mean, "items": items}
