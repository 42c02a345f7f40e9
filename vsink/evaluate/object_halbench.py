"""Object HalBench (Yu et al., RLHF-V, CVPR 2024) scored offline: rule-based CHAIR on detailed
descriptions of 300 COCO val2014 images, as ``eval/eval_gpt_obj_halbench.py`` of RLHF-V/RLHF-V
scores them without ``--use_gpt``.

Mentions are found as that script finds them (:func:`mentions`), which differs from the reference
``chair.py`` that ``vsink eval chair --vocabulary reference`` reproduces in three ways: its own
synonym table (``synonyms_refine.txt``, packaged as ``object_halbench_synonyms.txt``), NLTK's
WordNet lemmatiser instead of Pattern's singulariser (packaged as the table
``object_halbench_lemmas.tsv``, :mod:`vsink.evaluate.wordnet_lemmas`), and its pairs of words joined
from that table (``dining table``, ``coffee table``, ``remote control`` join; the ones the two
share are joined alike). The rest is vsink's CHAIR: the caption lower-cased and tokenised as NLTK's
``word_tokenize`` (:mod:`vsink.evaluate.reference_tokenize`), pairs joined left to right, every
``seat`` dropped when ``toilet`` occurs, every remaining table entry a mention of its class;
ground truth from the COCO instances and reference captions (:func:`vsink.evaluate.chair.ground_truth`
with this vocabulary); "Assistant:" removed from each answer, as the script does.

Scores: CHAIR_s (captions with a hallucinated mention / captions), CHAIR_s over captions with at
least one mention (the script's ``CHAIRs_refine``), CHAIR_i (hallucinated mentions / mentions),
object recall (distinct correctly mentioned classes / ground-truth classes, summed over captions)
and the average caption length in words split on single spaces.

The data: RLHF-V's ``obj_halbench_300_with_image.jsonl``, lines ``{image_id, question, image}``;
the base64 ``image`` is not read: the image is the COCO file of ``image_id`` named by
``--annotations`` (instances of val2014), read from IMAGE_DIR (COCO's val2014 folder).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..errors import VsinkError
from ..io import read_jsonl
from ..options import InputPath, Int, Option, Text
from ..readers import ReadError, read_lines
from .benchmarks import Benchmark, Metric, PathLike, Units
from .chair import Vocabulary, ground_truth, score_captions
from .reference_tokenize import word_tokenize
from .stats import ratio

SYNONYMS = Path(__file__).with_name("object_halbench_synonyms.txt")
LEMMAS = Path(__file__).with_name("object_halbench_lemmas.tsv")
SOURCE = "RLHF-V/RLHF-V eval/data/synonyms_refine.txt @ 3d35a91568b237fcc9d884463d9279fd7ae10350"
_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
ANSWER_FIELDS = {"image_id": Int(min=0), "caption": Text()}


@lru_cache(maxsize=1)
def table() -> dict[str, str]:
    """Entry → class of the packaged table (entries stripped; a repeated entry names its last
    line's class, as the script's dictionary does)."""
    entries: dict[str, str] = {}
    for _, line in read_lines(SYNONYMS):
        if line.startswith("#"):
            continue
        names = [n.strip() for n in line.split(", ")]
        for name in names:
            entries[name] = names[0]
    return entries


@lru_cache(maxsize=1)
def lemmas() -> dict[str, str]:
    """Word → WordNet noun lemma, for the words whose lemma matters here."""
    return dict(line.split("\t") for _, line in read_lines(LEMMAS))


@lru_cache(maxsize=1)
def double_words() -> dict[str, str]:
    """Two lemmatised tokens → the word they become: every entry of two or more words (a
    three-word entry can never match a pair), "home plate" and "train track" (kept as words the
    table does not have), baby/adult + animal → the animal, passenger jet/train, bow tie → tie,
    toilet seat → toilet, wine glas → wine glass."""
    pairs = {w: w for w in table() if len(w.split(" ")) >= 2}
    pairs.update({"home plate": "home plate", "train track": "train track"})
    for animal in _ANIMALS:
        pairs[f"baby {animal}"] = pairs[f"adult {animal}"] = animal
    pairs.update({"passenger jet": "jet", "passenger train": "train", "bow tie": "tie", "toilet seat": "toilet",
                  "wine glas": "wine glass"})
    return pairs


def caption_words(caption: str) -> list[str]:
    """Lower-cased tokens, lemmatised, pairs joined left to right."""
    lemma, pairs = lemmas(), double_words()
    tokens = [lemma.get(t, t) for t in word_tokenize(caption.lower())]
    out, i = [], 0
    while i < len(tokens):
        pair = " ".join(tokens[i:i + 2])
        if pair in pairs:
            out.append(pairs[pair])
            i += 2
        else:
            out.append(tokens[i])
            i += 1
    return out


def mentions(caption: str) -> list[tuple[str, str]]:
    """(word, class) for every object word, in order, as the script finds them."""
    words = caption_words(caption)
    if "toilet" in words and "seat" in words:
        words = [w for w in words if w != "seat"]
    entries = table()
    return [(w, entries[w]) for w in words if w in entries]


def vocabulary() -> Vocabulary:
    """Object HalBench's vocabulary for :mod:`vsink.evaluate.chair`."""
    return Vocabulary("object-halbench", SOURCE, table(), mentions)


def clean(answer: str) -> str:
    """The answer as the script reads it: "Assistant:" removed, stripped."""
    return answer.replace("Assistant:", "").strip()


def scorer(settings: dict[str, Any]) -> Callable[[Sequence[dict[str, Any]]], dict[str, Any]]:
    """Score answers against the ground truth of ``--annotations`` and ``--captions``."""
    if not settings.get("annotations"):
        raise VsinkError("Object HalBench needs --annotations (COCO instances of val2014) for the ground truth")
    vocab = vocabulary()
    truth = ground_truth(settings["annotations"], settings.get("captions"), vocab)

    def score(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        captions = [{"image_id": r["image_id"], "caption": clean(r["caption"])} for r in rows]
        out = score_captions(captions, truth, "Object HalBench answers", vocab)
        with_mention = sum(bool(c["mentioned"]) for c in out["captions"])
        bad = sum(bool(c["hallucinated"]) for c in out["captions"])
        out["chair_s_refine"] = bad / with_mention if with_mention else 0.0
        out["avg_len"] = sum(_length(c["caption"]) for c in out["captions"]) / out["n"]
        return out

    return score


def _length(caption: str) -> int:
    """The script's caption length: words split on single spaces."""
    return len(caption.strip().split(" "))


def _statistic(sums: np.ndarray) -> np.ndarray:
    captions, bad, with_mention, mentions, halluc, recalled, truth, words = (sums[..., i] for i in range(8))
    return np.stack([ratio(bad, captions), ratio(bad, with_mention), ratio(halluc, mentions), ratio(recalled, truth),
                     ratio(words, captions)], axis=-1)


def units(scores: dict[str, Any]) -> Units:
    """The **image** (one answer each): captions, captions with a hallucination, captions with a
    mention, mentions, hallucinated mentions, classes recalled, ground-truth classes, words."""
    rows: dict[str, np.ndarray] = {}
    for c in scores["captions"]:
        row = rows.setdefault(str(c["image_id"]), np.zeros(8))
        row += [1, bool(c["hallucinated"]), bool(c["mentioned"]), len(c["mentioned"]), len(c["hallucinated"]),
                c["recalled"], c["truth"], _length(c["caption"])]
    labels = [m.label for m in metrics(scores)]
    return Units("image", list(rows), np.array(list(rows.values())), labels, _statistic)


def read_items(path: PathLike, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The questions of ``obj_halbench_300_with_image.jsonl``: ``image_id``, ``question`` and the
    image's COCO file name from ``--annotations``."""
    from .coco import read_coco_objects

    if not settings.get("annotations"):
        raise VsinkError("Object HalBench needs --annotations (COCO instances of val2014): it names each image's file")
    files = read_coco_objects(settings["annotations"]).files
    rows = read_jsonl(path, ("image_id", "question"), fields={"image_id": Int(min=0), "question": Text()},
                      unique="image_id")
    items = []
    for n, row in enumerate(rows, 1):
        if row["image_id"] not in files:
            raise ReadError(f"{path}: line {n}: image_id {row['image_id']} is not in {settings['annotations']}")
        items.append({"image_id": row["image_id"], "question": row["question"], "image": files[row["image_id"]]})
    return items


def metrics(scores: dict[str, Any]) -> list[Metric]:
    return [Metric("CHAIR_s (%)", scores["chair_s"], lower_is_better=True),
            Metric("CHAIR_s over captions with an object (%)", scores["chair_s_refine"], lower_is_better=True),
            Metric("CHAIR_i (%)", scores["chair_i"], lower_is_better=True),
            Metric("object recall (%)", scores["recall"]),
            Metric("average length (words)", scores["avg_len"], 1, None)]


def details(scores: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    rows = [[str(c["image_id"]), ", ".join(c["mentioned"]) or "—", ", ".join(c["hallucinated"]) or "—"]
            for c in scores["captions"][:300]]
    return [("Objects per caption", ["image id", "mentioned classes", "hallucinated"], rows)]


OPTIONS = (
    Option("annotations", InputPath(), None, "COCO instances JSON (val2014): ground truth and image files",
           nullable=True),
    Option("captions", InputPath(), None, "COCO captions JSON (val2014): reference captions add ground-truth "
           "objects, as the script does", nullable=True),
)

BENCHMARK = Benchmark(
    name="object-halbench", title="Object HalBench", read_items=read_items, answer_fields=ANSWER_FIELDS,
    scorer=scorer, metrics=metrics, prompt="{question}", max_new_tokens=512,
    comparable="RLHF-V's eval_gpt_obj_halbench.py without --use_gpt (rule-based), with COCO instances and "
               "captions as ground truth; not the GPT-assisted numbers of the RLHF-V and RLAIF-V papers",
    key="image_id", field="caption", details=details, options=OPTIONS, units=units)
