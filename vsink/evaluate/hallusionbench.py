"""HallusionBench (Guan et al., CVPR 2024) scored offline: aAcc, fAcc and qAcc with rule-based
yes/no matching, as VLMEvalKit's ``exact_matching`` mode scores it (``vlmeval/dataset/utils/yorn.py``:
``YOrN_Extraction``, ``Hallusion_rating``), grouped as the official ``utils.py`` groups.

An answer is lower-cased and passed through VQA's punctuation step (:func:`punctuation`); it is
``Yes`` when its words contain ``yes`` and not ``no``, ``No`` when they contain ``no`` and not
``yes``, otherwise ``Unknown`` (wrong for either label). The label is ``gt_answer`` (``1`` yes,
``0`` no). aAcc: questions right; fAcc: figures (category, subcategory, set, figure) all of whose
questions are right, without the visual-supplement questions asked with no figure (figure 0 of
``VS``); qAcc: questions (category, subcategory, set, question) right on every figure they are
asked about. Each overall and per category (VD, VS). The official GPT-4 judge is not used: numbers
compare with VLMEvalKit's exact-matching results, not with the paper's GPT-judged table.

The data: the official ``HallusionBench.json``, a list of rows ``{category VD|VS, subcategory,
visual_input, set_id, figure_id, question_id, question, gt_answer, filename}``, images under
``hallusion_bench/`` beside it (``filename`` is relative to the JSON's folder).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import VsinkError
from ..options import AnyOf, Choice, Int, Text
from ..readers import ReadError, checked_field, read_json
from .benchmarks import Benchmark, Metric, PathLike, Units
from .stats import ratio

CATEGORIES = ("VD", "VS")
ID = AnyOf((Int(min=0), Text(r"\d+", "digits")))
FIELDS = {"category": Choice(CATEGORIES), "subcategory": Text(), "set_id": ID, "figure_id": ID, "question_id": ID,
          "gt_answer": Choice(("0", "1")), "question": Text()}
ANSWER_FIELDS = {**{k: v for k, v in FIELDS.items() if k != "question"}, "answer": Text()}
PROMPT = "{question}"

#: VQA's punctuation marks (VLMEvalKit's ``process_punctuation``)
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
#: as written there: the look-ahead ``(?!<=\d)`` never matches after a ".", so every "." not
#: followed by a digit goes
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")


def punctuation(text: str) -> str:
    """VQA's punctuation step as VLMEvalKit runs it: each mark is deleted when it touches a space
    somewhere in the text (or the text has a digit, comma, digit), otherwise replaced by a space;
    then periods not followed by a digit are deleted — at most 32 of them, because the reference
    passes ``re.UNICODE`` (32) where ``re.sub`` takes its ``count``."""
    out = text
    delete_all = _DIGIT_COMMA.search(text) is not None
    for p in _PUNCT:
        if delete_all or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=32)


def extract(answer: str) -> str:
    """``Yes``, ``No`` or ``Unknown`` (VLMEvalKit's rule-based extraction)."""
    words = punctuation(answer.lower()).split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "no" in words and "yes" not in words:
        return "No"
    return "Unknown"


def _ident(row: dict[str, Any], *keys: str) -> str:
    return "_".join(str(row[k]) for k in keys)


def _accuracies(rows: Sequence[dict[str, Any]], right: dict[str, bool]) -> dict[str, Any]:
    figures: dict[str, list[bool]] = {}
    pairs: dict[str, list[bool]] = {}
    for row in rows:
        ok = right[row["index"]]
        if not (row["category"] == "VS" and str(row["figure_id"]) == "0"):  # the official: "no figure"
            figures.setdefault(_ident(row, "category", "subcategory", "set_id", "figure_id"), []).append(ok)
        pairs.setdefault(_ident(row, "category", "subcategory", "set_id", "question_id"), []).append(ok)
    n = len(rows)
    return {"questions": n, "figures": len(figures), "question_pairs": len(pairs),
            "aAcc": sum(right[r["index"]] for r in rows) / n if n else None,
            "fAcc": sum(all(v) for v in figures.values()) / len(figures) if figures else None,
            "qAcc": sum(all(v) for v in pairs.values()) / len(pairs) if pairs else None}


def score_answers(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """aAcc, fAcc, qAcc overall and per category, the extraction counts (Yes/No/Unknown);
    ``items``: each question's official fields, whether it is ``right`` and its extraction (for
    the intervals: :func:`units`)."""
    keyed, right, counts = [], {}, {"Yes": 0, "No": 0, "Unknown": 0}
    for row in rows:
        index = _ident(row, "category", "subcategory", "set_id", "figure_id", "question_id")
        if index in right:  # the official asserts each question once
            raise VsinkError(f"HallusionBench question {index} answered twice; each is scored once")
        got = extract(row["answer"])
        counts[got] += 1
        right[index] = got == ("Yes" if str(row["gt_answer"]) == "1" else "No")
        keyed.append({**row, "index": index})
    items = [{**{k: str(r[k]) for k in ("category", "subcategory", "set_id", "figure_id", "question_id")},
              "index": r["index"], "right": right[r["index"]], "extracted": extract(r["answer"])} for r in keyed]
    out = {"overall": _accuracies(keyed, right), "extracted": counts, "n": len(keyed), "items": items}
    out["categories"] = {c: _accuracies([r for r in keyed if r["category"] == c], right)
                         for c in CATEGORIES if any(r["category"] == c for r in keyed)}
    out["subcategories"] = {s: _accuracies([r for r in keyed if f"{r['category']}/{r['subcategory']}" == s], right)
                            for s in sorted({f"{r['category']}/{r['subcategory']}" for r in keyed})}
    return out


#: the splits of the report rows, and per split the counts of one set: questions, right, figures,
#: figures all right, question pairs, pairs all right
SPLITS = ("overall", *CATEGORIES)
_COUNTS = 6


def _statistic(sums: np.ndarray) -> np.ndarray:
    s = sums[..., :-2].reshape(*sums.shape[:-1], len(SPLITS), _COUNTS)
    acc = np.stack([ratio(s[..., 1], s[..., 0]), ratio(s[..., 3], s[..., 2]), ratio(s[..., 5], s[..., 4])], axis=-1)
    return np.concatenate([acc.reshape(*sums.shape[:-1], -1), ratio(sums[..., -2], sums[..., -1])[..., None]], axis=-1)


def units(scores: dict[str, Any]) -> Units:
    """The **set** (category, subcategory, set_id): every figure group (fAcc) and question group
    (qAcc) lies inside one set, so a set's questions are resampled together. Per split (overall,
    VD, VS): questions, right, figures, figures all right, question groups, groups all right; then
    Unknown extractions and questions. McNemar on each question's right/wrong."""
    sets: dict[str, dict[str, dict[str, list[bool]]]] = {}
    for it in scores["items"]:
        ident = "_".join((it["category"], it["subcategory"], it["set_id"]))
        groups = sets.setdefault(ident, {"questions": {}, "figures": {}, "pairs": {}, "unknown": {}})
        groups["questions"][it["index"]] = [it["right"]]
        groups["unknown"][it["index"]] = [it["extracted"] == "Unknown"]
        if not (it["category"] == "VS" and it["figure_id"] == "0"):
            groups["figures"].setdefault(it["figure_id"], []).append(it["right"])
        groups["pairs"].setdefault(it["question_id"], []).append(it["right"])
    rows = []
    for ident, groups in sets.items():
        row = np.zeros(len(SPLITS) * _COUNTS + 2)
        for at in (0, SPLITS.index(ident.split("_", 1)[0]) * _COUNTS):
            row[at:at + _COUNTS] = [len(groups["questions"]), sum(v[0] for v in groups["questions"].values()),
                                    len(groups["figures"]), sum(all(v) for v in groups["figures"].values()),
                                    len(groups["pairs"]), sum(all(v) for v in groups["pairs"].values())]
        row[-2:] = [sum(v[0] for v in groups["unknown"].values()), len(groups["questions"])]
        rows.append(row)
    labels = [f"{split} {key} (%)" for split in SPLITS for key in ("aAcc", "fAcc", "qAcc")]
    return Units("set", list(sets), np.array(rows), labels + ["answers neither yes nor no (%)"], _statistic,
                 {it["index"]: bool(it["right"]) for it in scores["items"]})


def read_items(path: PathLike, settings: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    """The questions with a figure (an LVLM run needs an image) of the official
    ``HallusionBench.json``, each with ``index`` (category_subcategory_set_figure_question, the
    key), ``image`` (``filename`` without its leading ``./``) and the official fields."""
    data = read_json(path, "HallusionBench question list", top=list)
    items, seen = [], set()
    for i, row in enumerate(data):
        where = f"{path}: [{i}]"
        if not isinstance(row, dict):
            raise ReadError(f"{where} must be an object")
        item = {k: checked_field(row, k, kind, where) for k, kind in FIELDS.items()}
        visual = str(checked_field(row, "visual_input", Choice(("0", "1", "2")), where))
        if visual == "0":
            continue
        filename = checked_field(row, "filename", Text(r"\S.*", "a relative image path"), where)
        item.update(visual_input=visual, image=str(Path(filename.removeprefix("./"))),
                    index=_ident(item, "category", "subcategory", "set_id", "figure_id", "question_id"))
        if item["index"] in seen:
            raise ReadError(f"{where}: question {item['index']} repeats an earlier row")
        seen.add(item["index"])
        items.append(item)
    if not items:
        raise ReadError(f"{path}: no question with a figure (visual_input 1 or 2)")
    return items


def metrics(scores: dict[str, Any]) -> list[Metric]:
    rows = []
    for name, acc in [("overall", scores["overall"]), *scores["categories"].items()]:
        rows += [Metric(f"{name} {key} (%)", acc[key]) for key in ("aAcc", "fAcc", "qAcc")]
    rows.append(Metric("answers neither yes nor no (%)", scores["extracted"]["Unknown"] / scores["n"],
                       lower_is_better=True))
    return rows


def details(scores: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    def fmt(v: Optional[float]) -> str:
        return "—" if v is None else f"{v * 100:.2f}"

    head = ["split", "questions", "figures", "question pairs", "aAcc (%)", "fAcc (%)", "qAcc (%)"]
    body = [[name, str(a["questions"]), str(a["figures"]), str(a["question_pairs"]), fmt(a["aAcc"]), fmt(a["fAcc"]),
             fmt(a["qAcc"])] for name, a in [("overall", scores["overall"]), *scores["categories"].items(),
                                             *scores["subcategories"].items()]]
    extracted = [[k, str(v)] for k, v in scores["extracted"].items()]
    return [("Accuracies by split", head, body), ("Extracted answers", ["extracted", "answers"], extracted)]


def from_lmms_eval(doc: dict[str, Any], response: str, doc_id: Any) -> dict[str, Any]:
    """An answers row from a sample of lmms-eval's ``hallusion_bench_image`` task (its documents
    carry the official fields)."""
    row = {**{k: doc[k] for k in ANSWER_FIELDS if k != "answer"}, "answer": response}
    return {**row, "index": _ident(row, "category", "subcategory", "set_id", "figure_id", "question_id")}


BENCHMARK = Benchmark(
    name="hallusionbench", title="HallusionBench", read_items=read_items, answer_fields=ANSWER_FIELDS,
    scorer=lambda settings: score_answers, metrics=metrics, prompt=PROMPT, max_new_tokens=64,
    comparable="VLMEvalKit's HallusionBench with judge exact_matching (aAcc, fAcc, qAcc); not the paper's or the "
               "leaderboard's GPT-4-judged numbers",
    key="index", details=details, from_lmms_eval=from_lmms_eval, units=units)
