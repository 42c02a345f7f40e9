"""CHAIR (Rohrbach et al. 2018): object hallucination in captions, offline.

Two vocabularies find the object mentions of a caption:

* ``reference`` (default): caption for caption what the reference code finds (LisaAnne/Hallucination
  ``utils/chair.py`` with its ``data/synonyms.txt``), quirks included
  (:mod:`vsink.evaluate.chair_reference`); ``synonyms=FILE`` swaps in another table of the same format.
* ``vsink``: vsink's own table with the reference's errors fixed — punctuation bounds phrases,
  modifier nouns ("passenger train", "bus stop") and compounds ("laptop computer") count once and
  as what they name (:mod:`vsink.evaluate.chair_vsink`).

Ground truth of an image: its instance-annotation classes ∪ the classes mentioned in its reference
captions (when given), both through the chosen vocabulary. CHAIR_i = hallucinated mentions /
mentions; CHAIR_s = captions with ≥ 1 hallucinated mention / captions; recall = Σ |mentioned ∩
ground truth| / Σ |ground truth| over captions (as in OPERA's copy of the reference); avg_len =
mean words (runs of Unicode letters, "café" one word) per caption. 0 where a denominator is 0.

Several captions per image (sampled captions) are scored each, as the reference chair.py scores
every caption it is given; a caption is identified by its image and its ``sample`` index (given
in the file, or its position among the image's captions), and the same image and sample index
twice is an error: no caption is scored twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from ..errors import VsinkError
from ..io import read_jsonl
from ..options import Int, Text
from ..readers import checked_field, read_json, records
from . import chair_reference, chair_vsink
from .chair_words import SYNONYMS
from .coco import ID, read_coco_objects

VOCABULARIES = ("reference", "vsink")
#: the kinds of the fields of a generated-captions file
GENERATED_FIELDS = {"image_id": ID, "caption": Text(), "sample": Int(min=0)}


@dataclass(frozen=True)
class Vocabulary:
    """How captions are read: ``mentions(caption)`` gives (word, class) pairs; ``categories`` maps an
    annotation category name to its class."""

    name: str
    source: str
    categories: Mapping[str, str]
    mentions: Callable[[str], list[tuple[str, str]]]


def load_vocabulary(vocabulary: str = "reference",
                    synonyms: Union[str, os.PathLike, None] = None) -> Vocabulary:
    """The ``reference`` (default) or ``vsink`` vocabulary; ``synonyms``: a synonym table file in the
    reference format for the ``reference`` vocabulary (default: the packaged reference table)."""
    if vocabulary == "reference":
        table = chair_reference.read_synonyms(synonyms) if synonyms is not None else chair_reference.packaged_table()
        return Vocabulary("reference", table.source, table.entries,
                          lambda caption: chair_reference.mentions(caption, table))
    if vocabulary == "vsink":
        if synonyms is not None:
            raise VsinkError("a synonyms file applies to the reference vocabulary, not to 'vsink'")
        return Vocabulary("vsink", "vsink.evaluate.chair_words", {c: c for c in SYNONYMS}, chair_vsink.mentions)
    raise VsinkError(f"unknown CHAIR vocabulary {vocabulary!r}; vocabularies are {', '.join(VOCABULARIES)}")


def _as_vocabulary(vocabulary: Union[str, Vocabulary]) -> Vocabulary:
    return vocabulary if isinstance(vocabulary, Vocabulary) else load_vocabulary(vocabulary)


def ground_truth(annotations: Union[str, os.PathLike, dict],
                 captions: Union[None, str, os.PathLike, dict] = None,
                 vocabulary: Union[str, Vocabulary] = "reference") -> dict[int, set[str]]:
    """Image id → set of COCO classes (instances ∪ classes mentioned in reference captions)."""
    vocab = _as_vocabulary(vocabulary)
    coco = read_coco_objects(annotations)
    unknown = sorted({c for objs in coco.objects.values() for c in objs if c not in vocab.categories})
    if unknown:
        raise VsinkError(f"{coco.where}: categories {unknown[:5]} are not in the {vocab.name} vocabulary "
                         f"({vocab.source})")
    truth = {i: {vocab.categories[c] for c in objs} for i, objs in coco.objects.items()}
    if captions is not None:
        cwhere = "captions JSON" if isinstance(captions, dict) else str(captions)
        cdata = captions if isinstance(captions, dict) else read_json(captions, "COCO captions file")
        for at, ann in records(cdata, "annotations", cwhere):
            image = checked_field(ann, "image_id", ID, at)
            truth.setdefault(image, set()).update(c for _, c in vocab.mentions(checked_field(ann, "caption", Text(), at)))
    return truth


def read_generated(path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """A generated-captions JSONL to score: ``image_id`` (an integer) and ``caption`` (text) on
    every line, optionally ``sample`` (an integer >= 0: which of the image's captions). An image
    may have several captions; the same ``image_id`` and ``sample`` twice is an error (that caption
    would be scored twice). A caption that is null, a number or a list is an error, not text."""
    return read_jsonl(path, ("image_id", "caption"), fields=GENERATED_FIELDS, unique=("image_id", "sample"))


def score_captions(generated: Iterable[dict[str, Any]], truth: dict[int, set[str]],
                   where: str = "generated captions",
                   vocabulary: Union[str, Vocabulary] = "reference") -> dict[str, Any]:
    """CHAIR_i, CHAIR_s, recall, avg_len, the vocabulary used, the number of images and per-caption
    details (see the module docstring: every caption is scored, several per image allowed, the
    same image and ``sample`` index twice refused); ``truth`` must come from :func:`ground_truth`
    with the same vocabulary."""
    vocab = _as_vocabulary(vocabulary)
    details, n_mentions, n_halluc, n_bad, hit, gt_total, lengths = [], 0, 0, 0, 0, 0, []
    seen: dict[tuple[int, int], int] = {}
    per_image: dict[int, int] = {}
    for i, row in enumerate(generated):
        if not isinstance(row, Mapping) or "image_id" not in row or "caption" not in row:
            raise VsinkError(f"{where}: item {i} needs image_id and caption")
        image_id = checked_field(row, "image_id", ID, f"{where}: item {i}")
        sample = (checked_field(row, "sample", GENERATED_FIELDS["sample"], f"{where}: item {i}") if "sample" in row
                  else per_image.get(image_id, 0))
        if (image_id, sample) in seen:
            raise VsinkError(f"{where}: item {i}: image_id {image_id} sample {sample} was captioned before "
                             f"(item {seen[(image_id, sample)]}); each caption is scored once")
        seen[(image_id, sample)] = i
        per_image[image_id] = per_image.get(image_id, 0) + 1
        caption = checked_field(row, "caption", Text(), f"{where}: item {i}")
        if image_id not in truth:
            raise VsinkError(f"{where}: item {i}: image_id {image_id} is not in the annotations")
        gt = truth[image_id]
        found = vocab.mentions(caption)
        halluc = [(p, c) for p, c in found if c not in gt]
        n_mentions += len(found)
        n_halluc += len(halluc)
        n_bad += bool(halluc)
        recalled = len({c for _, c in found} & gt)
        hit += recalled
        gt_total += len(gt)
        lengths.append(len(chair_vsink.words(caption)))
        details.append({"image_id": image_id, "sample": sample, "caption": caption, "mentioned": [c for _, c in found],
                        "hallucinated": [c for _, c in halluc], "mentioned_words": [p for p, _ in found],
                        "hallucinated_words": [p for p, _ in halluc], "recalled": recalled, "truth": len(gt),
                        "words": lengths[-1]})
    if not details:
        raise VsinkError(f"{where}: no captions to score")
    return {"chair_i": n_halluc / n_mentions if n_mentions else 0.0, "chair_s": n_bad / len(details),
            "recall": hit / gt_total if gt_total else 0.0, "avg_len": sum(lengths) / len(lengths),
            "n": len(details), "images": len(per_image), "mentions": n_mentions, "hallucinated_mentions": n_halluc,
            "vocabulary": vocab.name, "synonyms": vocab.source, "captions": details}


def score_chair(generated: Iterable[dict[str, Any]], annotations: Union[str, os.PathLike, dict],
                captions: Optional[Union[str, os.PathLike, dict]] = None, *, vocabulary: str = "reference",
                synonyms: Union[str, os.PathLike, None] = None) -> dict[str, Any]:
    """Score generated captions (dicts with ``image_id`` and ``caption``) against COCO instance
    annotations and, optionally, COCO reference captions.

    ``vocabulary``: ``"reference"`` (default; equal to the reference chair.py caption for caption)
    or ``"vsink"`` (vsink's table, the reference's errors fixed). ``synonyms``: a synonym table in
    the reference's ``synonyms.txt`` format for the reference vocabulary (default: the packaged
    copy of the reference table)."""
    vocab = load_vocabulary(vocabulary, synonyms)
    return score_captions(generated, ground_truth(annotations, captions, vocab), vocabulary=vocab)
