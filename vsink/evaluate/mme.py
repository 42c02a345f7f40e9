"""MME's hallucination subset (Fu et al. 2023): existence, count, position and colour, two yes/no
questions per image, scored as lmms-eval scores MME (``lmms_eval/tasks/mme/utils.py``).

Answers are read by lmms-eval's parser (:func:`parse_answer`): lower-cased, stripped, every
``.`` removed; exactly ``yes`` or ``no`` is that answer; a single character is yes for ``y``, no
for ``n``; otherwise ``yes`` anywhere in the first 4 characters is yes, else ``no`` there is no,
else the answer is ``other`` (wrong for either label). Per category: accuracy over questions,
accuracy+ over images (both questions right), score = (accuracy + accuracy+) × 100, at most 200;
the subset's total is the sum over its categories (at most 800). lmms-eval refuses an image
without exactly two questions; so does :func:`score_answers`.

The data: the MME release folder (``MME_Benchmark_release_version``), one folder per category,
each image with a ``.txt`` of the same name beside it (or images in ``images/`` and the texts in
``questions_answers_YES_NO/``), each line ``question<TAB>Yes|No``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import VsinkError
from ..options import Choice, Text
from ..readers import ReadError, read_lines
from .benchmarks import Benchmark, Metric, PathLike, Units
from .stats import ratio

#: the hallucination subset, named as in MME's folders and lmms-eval's ``category`` field
CATEGORIES = ("existence", "count", "position", "color")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: lmms-eval's default MME prompt drops this from each question and appends its own instruction
LMMS_EVAL_REMOVED = " Please answer yes or no."
PROMPT = "{question}\nAnswer the question using a single word or phrase."
ANSWER_FIELDS = {"question_id": Text(), "image_id": Text(), "category": Choice(CATEGORIES),
                 "label": Choice(("yes", "no")), "answer": Text()}


def parse_answer(text: str) -> str:
    """``yes``, ``no`` or ``other``, by lmms-eval's MME rule (module docstring)."""
    t = text.lower().strip().replace(".", "")
    if t in ("yes", "no"):
        return t
    if len(t) == 1:
        return {"y": "yes", "n": "no"}.get(t, "other")
    head = t[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def _qa_file(folder: Path, image: Path) -> Optional[Path]:
    for candidate in (image.with_suffix(".txt"), folder / "questions_answers_YES_NO" / (image.stem + ".txt")):
        if candidate.is_file():
            return candidate
    return None


def read_items(root: PathLike, settings: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    """The questions of the four categories under the MME release folder ``root``, in file order:
    ``question_id`` (``category/image#n``), ``image_id`` (``category/image``), ``image`` (relative to
    ``root``), ``category``, ``question`` (without " Please answer yes or no.", which lmms-eval's
    default prompt replaces by its own instruction: :data:`PROMPT`), ``label`` (yes/no)."""
    root = Path(root)
    if not root.is_dir():
        raise ReadError(f"{root}: MME needs the release folder (existence/, count/, position/, color/)")
    items = []
    for category in CATEGORIES:
        folder = root / category
        if not folder.is_dir():
            raise ReadError(f"{root}: no folder {category}/ (MME release layout: one folder per category)")
        image_dir = folder / "images" if (folder / "images").is_dir() else folder
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ReadError(f"{folder}: no images (.jpg, .png)")
        for image in images:
            qa = _qa_file(folder, image)
            if qa is None:
                raise ReadError(f"{image}: no question file {image.stem}.txt beside it or in questions_answers_YES_NO/")
            lines = read_lines(qa)
            if len(lines) != 2:
                raise ReadError(f"{qa}: MME has two questions per image, found {len(lines)}")
            image_id = f"{category}/{image.name}"
            for n, (line_no, line) in enumerate(lines):
                question, tab, answer = line.rpartition("\t")
                label = answer.strip().lower().replace(".", "")
                if not tab or label not in ("yes", "no"):
                    raise ReadError(f"{qa}:{line_no}: expected 'question<TAB>Yes|No', got {line[:80]!r}")
                items.append({"question_id": f"{image_id}#{n}", "image_id": image_id,
                              "image": str(image.relative_to(root)), "category": category,
                              "question": question.strip().replace(LMMS_EVAL_REMOVED, ""), "label": label})
    return items


def limit(items: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The first ``n`` questions, completed to whole images (MME scores pairs)."""
    keep = {it["image_id"] for it in items[:n]}
    return [it for it in items if it["image_id"] in keep]


def score_answers(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per category ``accuracy``, ``accuracy_plus``, ``score`` (0–200), question and image counts
    and the answers parsed as ``other``; ``total`` (sum of the category scores present); ``items``:
    each question's ``question_id``, ``image_id``, ``category`` and whether it is ``right`` (for
    the intervals: :func:`units`)."""
    by_image: dict[str, list[dict[str, Any]]] = {}
    items = []
    for row in rows:
        by_image.setdefault(f"{row['category']}\0{row['image_id']}", []).append(row)
    categories: dict[str, dict[str, Any]] = {}
    for ident, group in by_image.items():
        category, image_id = ident.split("\0")
        if len(group) != 2:
            raise VsinkError(f"MME image {image_id}: {len(group)} answered question(s); MME scores each image's "
                             "two questions together (lmms-eval refuses it too)")
        right = [parse_answer(r["answer"]) == r["label"] for r in group]
        items += [{"question_id": str(r["question_id"]), "image_id": image_id, "category": category, "right": ok}
                  for r, ok in zip(group, right)]
        c = categories.setdefault(category, {"questions": 0, "correct": 0, "images": 0, "both": 0, "other": 0})
        c["questions"] += 2
        c["correct"] += sum(right)
        c["images"] += 1
        c["both"] += all(right)
        c["other"] += sum(parse_answer(r["answer"]) == "other" for r in group)
    out = {}
    for category in [c for c in CATEGORIES if c in categories]:
        c = categories[category]
        acc, acc_plus = c["correct"] / c["questions"], c["both"] / c["images"]
        out[category] = {**c, "accuracy": acc, "accuracy_plus": acc_plus, "score": (acc + acc_plus) * 100}
    return {"categories": out, "total": sum(c["score"] for c in out.values()),
            "n": sum(c["questions"] for c in out.values()), "items": items}


#: per category, the counts of one image: questions right, both right, questions, images
_COUNTS = 4


def _statistic(sums: np.ndarray) -> np.ndarray:
    s = sums.reshape(*sums.shape[:-1], len(CATEGORIES), _COUNTS)
    acc, acc_plus = ratio(s[..., 0], s[..., 2]), ratio(s[..., 1], s[..., 3])
    score = (acc + acc_plus) * 100
    per = np.stack([score, acc, acc_plus], axis=-1).reshape(*sums.shape[:-1], -1)
    return np.concatenate([score.sum(axis=-1, keepdims=True), per], axis=-1)


def units(scores: dict[str, Any]) -> Units:
    """The **image** (its two questions together: accuracy+ pairs them): per category, questions
    right, both right, 2 questions, 1 image; McNemar on each question's right/wrong. A category
    no image of a resample is drawn from scores 0 there (and in the total)."""
    rows: dict[str, np.ndarray] = {}
    for it in scores["items"]:
        key = f"{it['category']}/{it['image_id']}"
        row = rows.setdefault(key, np.zeros(len(CATEGORIES) * _COUNTS))
        at = CATEGORIES.index(it["category"]) * _COUNTS
        row[at] += it["right"]
        row[at + 2] += 1
    for key, row in rows.items():
        at = CATEGORIES.index(key.split("/", 1)[0]) * _COUNTS
        row[at + 1], row[at + 3] = float(row[at] == row[at + 2]), 1.0
    labels = ["total score (sum of categories)"] + [label for c in CATEGORIES for label in (
        f"{c} score (0–200)", f"{c} accuracy (%)", f"{c} accuracy+ (%)")]
    return Units("image", list(rows), np.array(list(rows.values())), labels, _statistic,
                 {it["question_id"]: bool(it["right"]) for it in scores["items"]})


def metrics(scores: dict[str, Any]) -> list[Metric]:
    rows = [Metric("total score (sum of categories)", scores["total"], 1)]
    for category, c in scores["categories"].items():
        rows += [Metric(f"{category} score (0–200)", c["score"], 1), Metric(f"{category} accuracy (%)", c["accuracy"]),
                 Metric(f"{category} accuracy+ (%)", c["accuracy_plus"])]
    return rows


def details(scores: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    header = ["category", "questions", "correct", "images", "both right", "answers parsed as other"]
    return [("Counts", header, [[cat, *(str(c[k]) for k in ("questions", "correct", "images", "both", "other"))]
                                for cat, c in scores["categories"].items()])]


def from_lmms_eval(doc: dict[str, Any], response: str, doc_id: Any) -> Optional[dict[str, Any]]:
    """An answers row from a sample of lmms-eval's ``mme`` task (``lmms-lab/MME``: ``question_id``
    — the image, shared by its two questions —, ``category``, ``answer``); None outside the four
    categories."""
    if doc["category"] not in CATEGORIES:
        return None
    label = str(doc["answer"]).lower().strip().replace(".", "")
    return {"question_id": f"{doc['question_id']}#{doc_id}", "image_id": str(doc["question_id"]),
            "category": doc["category"], "label": label, "answer": response}


BENCHMARK = Benchmark(
    name="mme", title="MME hallucination subset", read_items=read_items, answer_fields=ANSWER_FIELDS,
    scorer=lambda settings: score_answers, metrics=metrics, prompt=PROMPT, max_new_tokens=16,
    comparable="lmms-eval's mme task with its default prompt (the default here; its per-category scores for existence, count, position "
               "and color; its perception total adds six more categories)",
    limit=limit, details=details, from_lmms_eval=from_lmms_eval, units=units)
