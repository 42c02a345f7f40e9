"""AMBER (Wang et al. 2023) scored offline as its ``inference.py`` scores it
(junyangwang0410/AMBER @ 534babf).

**Discriminative** (existence, attribute — state, number, action — and relation yes/no
questions): only the exact strings ``Yes`` and ``No`` count (``--yes-no first-word`` reads the
first word of an answer instead: vsink's option, not the reference's); "no" is the positive class:
precision = right "No" answers / "No" answers, recall = right "No" answers / questions whose truth
is no; every count that is a denominator starts at 0.001 (``metrics.txt``), so attribute, the sum
of three types, starts at 0.003; accuracy, precision and recall are rounded to 1 decimal and F1 is
computed from the rounded precision and recall, + 0.0001 in its denominator (+ 0.001 for
existence), then rounded.

**Generative** ("Describe this image."): the response's words (NLTK tokens, WordNet noun lemmas)
that are words of ``relation.json`` (keys and their associated words) are its objects; each one
that is a global safe word (``safe_words.txt``) is skipped; one that is a truth object or
associated with one covers that truth object and is not hallucinated; one that is a prior-likely
("hallu") object or associated with one covers it (Cog); one *similar* to a hallu or truth word
covers it likewise (and, for a truth word, is not hallucinated); every other one is hallucinated.
CHAIR = hallucinated / objects (global safe words counted in the denominator), Cover = truth
objects covered / truth objects, Hal = responses with a hallucinated object / responses, Cog =
hallu objects covered / hallu objects; each from counts that start at 0.001, rounded to 1 decimal.

Two parts of the reference need data that is not here offline, and the result records the
settings used (``settings`` in the scores): nouns — the reference keeps the words NLTK's tagger
tags as nouns; without the tagger every token is kept (only words of ``relation.json`` matter, so
this differs only where such a word is used as a verb or adjective: "orange", "light"); word
similarity — spaCy ``en_core_web_lg`` token similarity > 0.8; without that model similarity is off
(exact matches only). Lemmas: NLTK's WordNet lemmatiser as the packaged table ``amber_lemmas.tsv``
(:mod:`vsink.evaluate.wordnet_lemmas`, for the words of the released ``relation.json``).

The data: AMBER's ``data/`` folder: ``annotations.json`` (``{id, type, truth[, hallu]}``, the row
of id *n* at position *n*), ``relation.json``, ``safe_words.txt`` and ``query/query_all.json``
(``{id, image, query}``); the images (``AMBER_n.jpg``) in IMAGE_DIR.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..errors import VsinkError, VsinkWarning
from ..options import Choice, Float, Int, Option, Text
from ..readers import ReadError, checked_field, read_json, read_lines
from .benchmarks import Benchmark, Metric, PathLike, Units
from .reference_tokenize import word_tokenize

LEMMAS = Path(__file__).with_name("amber_lemmas.tsv")
LEMMA_SOURCE = "WordNet 3.0 (wordnet-base 1:3.0-37) for junyangwang0410/AMBER data/relation.json @ 534babf"
#: annotation type → the reference's counter group (every other discriminative type is relation)
TYPES = {"discriminative-hallucination": "existence", "discriminative-attribute-state": "state",
         "discriminative-attribute-number": "number", "discriminative-attribute-action": "action"}
GROUPS = ("existence", "state", "number", "action", "relation")
QUERIES = ("all", "generative", "discriminative", "discriminative-existence", "discriminative-attribute",
           "discriminative-relation")
ANSWER_FIELDS = {"id": Int(min=1), "response": Text()}
START = 0.001


@lru_cache(maxsize=1)
def lemmas() -> dict[str, str]:
    """Word → WordNet noun lemma for the words whose lemma matters to AMBER's vocabulary."""
    return dict(line.split("\t") for _, line in read_lines(LEMMAS))


def candidate_nouns(response: str) -> list[str]:
    """The response's tokens (not lower-cased, as in the reference), lemmatised; every token is
    kept (no POS tagger offline)."""
    table = lemmas()
    return [table.get(t, t) for t in word_tokenize(response)]


def yes_no(response: str, mode: str) -> str:
    """The answer the discriminative scorer sees: the response (``exact``), or its first word
    without punctuation, capitalised (``first-word``)."""
    if mode == "exact":
        return response
    words = response.strip().split()
    return words[0].strip(".,!?;:\"'").capitalize() if words else ""


def _rounded(groups: list[dict[str, float]], eps: float) -> dict[str, float]:
    total = {k: sum(g[k] for g in groups) for k in groups[0]}
    acc = round(total["correct_score"] / total["correct_num"] * 100, 1)
    precision = round(total["ans_no_score"] / total["ans_no_num"] * 100, 1)
    recall = round(total["no_score"] / total["no_num"] * 100, 1)
    f1 = round(2 * (precision / 100) * (recall / 100) / ((precision / 100) + (recall / 100) + eps) * 100, 1)
    return {"accuracy": acc, "precision": precision, "recall": recall, "f1": f1,
            "questions": round(total["correct_num"] - START * len(groups))}


def score_discriminative(rows: Sequence[tuple[dict[str, Any], str]], mode: str = "exact") -> dict[str, Any]:
    """The reference's discriminative metrics from (annotation, response) pairs; ``items``: each
    question's ``id``, counter ``group``, ``truth`` and the ``answer`` seen."""
    groups = {g: {"correct_num": START, "correct_score": 0, "no_num": START, "no_score": 0,
                  "ans_no_num": START, "ans_no_score": 0} for g in GROUPS}
    overall = {k: (START if k.endswith("num") else 0) for k in groups["existence"]}
    other, items = 0, []
    for ann, response in rows:
        answer = yes_no(response, mode)
        other += answer not in ("Yes", "No")
        items.append({"id": ann.get("id"), "group": TYPES.get(ann["type"], "relation"), "truth": ann["truth"],
                      "answer": answer})
        for c in (groups[TYPES.get(ann["type"], "relation")], overall):
            c["correct_num"] += 1
            if ann["truth"] == "yes":
                c["correct_score"] += answer == "Yes"
            else:
                c["no_num"] += 1
                c["correct_score"] += answer == "No"
                c["no_score"] += answer == "No"
            if answer == "No":
                c["ans_no_num"] += 1
                c["ans_no_score"] += ann["truth"] == "no"
    out = {"overall": _rounded([overall], 0.0001), "existence": _rounded([groups["existence"]], 0.001),
           "attribute": _rounded([groups[g] for g in ("state", "number", "action")], 0.0001)}
    out.update({g: _rounded([groups[g]], 0.0001) for g in ("state", "number", "action", "relation")})
    return {"types": {k: v for k, v in out.items() if v["questions"]}, "neither_yes_nor_no": other, "items": items}


def score_generative(rows: Sequence[tuple[dict[str, Any], str]], relation: dict[str, list[str]],
                     safe: set[str], similar: Callable[[str, str], float], threshold: float) -> dict[str, Any]:
    """The reference's CHAIR, Cover, Hal and Cog from (annotation, response) pairs."""
    vocabulary = set(relation) | {w for words in relation.values() for w in words}
    m = {"chair_num": START, "chair_score": 0, "safe_cover_num": START, "safe_cover_score": 0,
         "hallu_cover_num": START, "hallu_cover_score": 0, "non_hallu_num": START, "non_hallu_score": 0}
    per_response = []
    for ann, response in rows:
        nouns = [n for n in candidate_nouns(response) if n in vocabulary]
        truth, hallu = list(ann["truth"]), list(ann.get("hallu", []))
        # each list: the words associated with each object (owner index), then the objects themselves
        safe_words = [w for t in truth for w in relation[t]] + truth
        safe_owner = [i for i, t in enumerate(truth) for _ in relation[t]] + list(range(len(truth)))
        ha_words = [w for h in hallu for w in relation[h]] + hallu
        ha_owner = [i for i, h in enumerate(hallu) for _ in relation[h]] + list(range(len(hallu)))
        covered, cog = [0] * len(truth), [0] * len(hallu)
        hallucinated = []
        for noun in nouns:
            if noun in safe:
                continue
            if noun in safe_words:
                covered[safe_owner[safe_words.index(noun)]] = 1
                continue
            if noun in ha_words:
                cog[ha_owner[ha_words.index(noun)]] = 1
            for j, word in enumerate(ha_words):
                if similar(noun, word) > threshold:
                    cog[ha_owner[j]] = 1
                    break
            match = next((j for j, word in enumerate(safe_words) if similar(noun, word) > threshold), None)
            if match is not None:
                covered[safe_owner[match]] = 1
                continue
            hallucinated.append(noun)
        m["chair_score"] += len(hallucinated)
        m["chair_num"] += len(nouns)
        m["safe_cover_score"] += sum(covered)
        m["safe_cover_num"] += len(truth)
        m["hallu_cover_score"] += sum(cog)
        m["hallu_cover_num"] += len(hallu)
        m["non_hallu_score"] += not hallucinated
        m["non_hallu_num"] += 1
        per_response.append({"id": ann["id"], "objects": nouns, "hallucinated": hallucinated, "truth": len(truth),
                             "covered": sum(covered), "hallu": len(hallu), "cog": sum(cog)})
    return {"CHAIR": round(m["chair_score"] / m["chair_num"] * 100, 1),
            "Cover": round(m["safe_cover_score"] / m["safe_cover_num"] * 100, 1),
            "Hal": round(100 - m["non_hallu_score"] / m["non_hallu_num"] * 100, 1),
            "Cog": round(m["hallu_cover_score"] / m["hallu_cover_num"] * 100, 1),
            "responses": len(per_response), "objects": round(m["chair_num"] - START),
            "hallucinated_objects": m["chair_score"], "per_response": per_response}


def spacy_similarity(model: str) -> tuple[Optional[Callable[[str, str], float]], str]:
    """spaCy token similarity with ``model``, or None and why not."""
    try:
        import spacy
    except ImportError:
        return None, "spaCy is not installed"
    try:
        nlp = spacy.load(model)
    except OSError:
        return None, f"the spaCy model {model} is not installed"

    @lru_cache(maxsize=None)
    def doc(word: str):
        return nlp(word)

    return (lambda a, b: float(doc(a).similarity(doc(b)))), f"spaCy {model}"


def read_data(folder: str) -> tuple[dict[int, dict[str, Any]], dict[str, list[str]], frozenset[str]]:
    """Annotations by id, ``relation.json`` and the global safe words of AMBER's data folder."""
    root = Path(folder)
    for name in ("annotations.json", "relation.json", "safe_words.txt"):
        if not (root / name).is_file():
            raise ReadError(f"{root}: no {name} (AMBER's data/ folder holds annotations.json, relation.json, "
                            "safe_words.txt and query/)")
    relation = read_json(root / "relation.json", "relation.json (word → associated words)")
    for word, assoc in relation.items():
        if not isinstance(assoc, list) or not all(isinstance(w, str) for w in assoc):
            raise ReadError(f"{root / 'relation.json'}: '{word}' must map to a list of words")
    annotations = {}
    for i, row in enumerate(read_json(root / "annotations.json", "AMBER annotation list", top=list)):
        where = f"{root / 'annotations.json'}: [{i}]"
        if not isinstance(row, dict):
            raise ReadError(f"{where} must be an object")
        ident = checked_field(row, "id", Int(min=1), where)
        kind = checked_field(row, "type", Text(), where)
        if kind == "generative":
            for key in ("truth", "hallu"):
                words = row.get(key, [])
                if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                    raise ReadError(f"{where}: field '{key}' must be a list of words")
                unknown = [w for w in words if w not in relation]
                if unknown:
                    raise ReadError(f"{where}: {key} word '{unknown[0]}' is not a key of relation.json")
        else:
            checked_field(row, "truth", Choice(("yes", "no")), where)
        annotations[ident] = row
    safe = frozenset(line for _, line in read_lines(root / "safe_words.txt"))
    return annotations, relation, safe


def scorer(settings: dict[str, Any]) -> Callable[[Sequence[dict[str, Any]]], dict[str, Any]]:
    """Score ``{id, response}`` rows against the data folder of ``settings['data']``."""
    if not settings.get("data"):
        raise VsinkError("AMBER needs --data (its data/ folder: annotations, relation.json, safe words)")
    annotations, relation, safe = read_data(str(settings["data"]))
    similar, how = spacy_similarity(settings["similarity_model"])
    if similar is None:
        warnings.warn(f"AMBER: {how}: word similarity is off, objects match only exactly (the reference uses "
                      f"{settings['similarity_model']} similarity > {settings['similarity_score']})", VsinkWarning,
                      stacklevel=2)
    used = {"nouns": "every token (no POS tagger offline)", "lemmas": LEMMA_SOURCE, "yes_no": settings["yes_no"],
            "word_similarity": (f"{how} > {settings['similarity_score']}" if similar is not None
                                else f"off: exact matches only ({how})")}

    def score(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        pairs = []
        for row in rows:
            if row["id"] not in annotations:
                raise VsinkError(f"AMBER answer id {row['id']} is not in annotations.json")
            for key in ("truth", "hallu"):  # carried by an lmms-eval sample: its document must be this id's
                if key in row and sorted(row[key]) != sorted(annotations[row["id"]].get(key, [])):
                    raise VsinkError(f"AMBER answer id {row['id']}: its lmms-eval document's {key} {row[key]} differs "
                                     f"from annotations.json's {annotations[row['id']].get(key, [])}")
            pairs.append((annotations[row["id"]], row["response"]))
        gen = [p for p in pairs if p[0]["type"] == "generative"]
        dis = [p for p in pairs if p[0]["type"] != "generative"]
        out: dict[str, Any] = {"settings": used, "n": len(pairs)}
        if gen:
            out["generative"] = score_generative(gen, relation, set(safe), similar or (lambda a, b: 0.0),
                                                 settings["similarity_score"])
        if dis:
            out["discriminative"] = score_discriminative(dis, settings["yes_no"])
            out["items"] = out["discriminative"].pop("items")  # per question: resampled, then dropped
        return out

    return score


def read_items(folder: PathLike, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The queries of ``query/query_<queries>.json`` in AMBER's data folder."""
    path = Path(folder) / "query" / f"query_{settings['queries']}.json"
    annotations = read_data(str(folder))[0]
    items = []
    for i, row in enumerate(read_json(path, "AMBER query list", top=list)):
        where = f"{path}: [{i}]"
        if not isinstance(row, dict):
            raise ReadError(f"{where} must be an object")
        ident = checked_field(row, "id", Int(min=1), where)
        if ident not in annotations:
            raise ReadError(f"{where}: id {ident} is not in annotations.json")
        items.append({"id": ident, "image": checked_field(row, "image", Text(r"\S.*", "an image file name"), where),
                      "question": checked_field(row, "query", Text(), where), "type": annotations[ident]["type"]})
    return items


#: the report's discriminative types: (name, counter groups summed, counters started at 0.001,
#: F1's epsilon); overall is the reference's own counter over every question
_TYPES = (("overall", GROUPS, 1, 0.0001), ("existence", ("existence",), 1, 0.001),
          ("attribute", ("state", "number", "action"), 3, 0.0001), *((g, (g,), 1, 0.0001) for g in GROUPS[1:]))
#: per counter group, a question's counts: asked, right, truth no, right no, answered No, answered No rightly
_D = 6
#: a response's generative counts: objects, hallucinated, truth objects, covered, hallu objects, covered
#: (Cog), responses with a hallucinated object, responses
_G = 8


def _statistic(sums: np.ndarray) -> np.ndarray:
    g = sums[..., :len(GROUPS) * _D].reshape(*sums.shape[:-1], len(GROUPS), _D)
    out = []
    for _, members, starts, eps in _TYPES:
        c = sum(g[..., GROUPS.index(m), :] for m in members)
        start = START * starts
        acc, precision, recall = (c[..., 1] / (c[..., 0] + start) * 100, c[..., 5] / (c[..., 4] + start) * 100,
                                  c[..., 3] / (c[..., 2] + start) * 100)
        f1 = 2 * (precision / 100) * (recall / 100) / (precision / 100 + recall / 100 + eps) * 100
        out += [acc, precision, recall, f1]
    objects, bad, truth, covered, hallu, cog, hal, responses = (sums[..., len(GROUPS) * _D + i] for i in range(_G))
    gen = [bad / (objects + START) * 100, covered / (truth + START) * 100,
           100 - (responses - hal) / (responses + START) * 100, cog / (hallu + START) * 100]
    return np.stack(gen + out, axis=-1)


def units(scores: dict[str, Any]) -> Units:
    """The **query** (an AMBER id): a generative query is one image's description, a discriminative
    one a question. Per counter group a question's six counts, then a response's eight generative
    counts; the reference's formulae unrounded, its 0.001 starts kept. McNemar on the
    discriminative questions' right/wrong."""
    rows: dict[str, np.ndarray] = {}
    correct = {}
    for q in scores.get("items", []):
        row = np.zeros(len(GROUPS) * _D + _G)
        no, said_no = q["truth"] == "no", q["answer"] == "No"
        right = q["answer"] == ("No" if no else "Yes")
        at = GROUPS.index(q["group"]) * _D
        row[at:at + _D] = [1, right, no, no and said_no, said_no, said_no and no]
        rows[str(q["id"])] = row
        correct[str(q["id"])] = bool(right)
    for r in scores.get("generative", {}).get("per_response", []):
        row = np.zeros(len(GROUPS) * _D + _G)
        row[len(GROUPS) * _D:] = [len(r["objects"]), len(r["hallucinated"]), r["truth"], r["covered"], r["hallu"],
                                  r["cog"], bool(r["hallucinated"]), 1]
        rows[str(r["id"])] = row
    labels = [f"generative {k}" for k in ("CHAIR", "Cover", "Hal", "Cog")]
    labels += [f"{name} {k}" for name, _, _, _ in _TYPES for k in ("accuracy", "precision", "recall", "f1")]
    return Units("query", list(rows), np.array(list(rows.values())), labels, _statistic,
                 correct if correct else None)


def metrics(scores: dict[str, Any]) -> list[Metric]:
    rows = []
    gen = scores.get("generative")
    if gen:
        rows += [Metric("generative CHAIR", gen["CHAIR"], 1, True), Metric("generative Cover", gen["Cover"], 1),
                 Metric("generative Hal", gen["Hal"], 1, True), Metric("generative Cog", gen["Cog"], 1, True)]
    for name, t in scores.get("discriminative", {}).get("types", {}).items():
        rows += [Metric(f"{name} {k}", t[k], 1) for k in ("accuracy", "precision", "recall", "f1")]
    return rows


def details(scores: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    out = [("Settings used", ["setting", "value"], [[k, str(v)] for k, v in scores["settings"].items()])]
    if "discriminative" in scores:
        d = scores["discriminative"]
        out.append(("Discriminative questions", ["type", "questions"],
                    [[k, str(v["questions"])] for k, v in d["types"].items()]
                    + [["answers neither Yes nor No", str(d["neither_yes_nor_no"])]]))
    if "generative" in scores:
        out.append(("Generative: objects per response", ["id", "objects", "hallucinated"],
                    [[str(r["id"]), ", ".join(r["objects"]) or "—", ", ".join(r["hallucinated"]) or "—"]
                     for r in scores["generative"]["per_response"][:300]]))
    return out


OPTIONS = (
    Option("queries", Choice(QUERIES), "all", "which query file of data/query/ to run (query_NAME.json)"),
    Option("yes_no", Choice(("exact", "first-word")), "exact", "discriminative answers: exact: only 'Yes' and "
           "'No' count (the reference); first-word: the answer's first word, capitalised (vsink's)"),
    Option("similarity_model", Text(r"\S+", "a spaCy model name"), "en_core_web_lg", "spaCy vector model for "
           "word similarity (off, with a warning, where it is not installed)"),
    Option("similarity_score", Float(0, 1), 0.8, "word similarity above which two words match"),
)

def from_lmms_eval(doc: dict[str, Any], response: str, doc_id: Any) -> dict[str, Any]:
    """An answers row from a sample of lmms-eval's ``amber_g`` task (AMBER's generative queries;
    ``lmms_eval/tasks/amber_g/utils.py`` reads ``question_id``, ``truth`` and ``hallu`` from each
    document): ``question_id`` as the AMBER id, and the document's ``truth``/``hallu`` object words,
    which the scorer checks against annotations.json's for that id (so a data set numbered
    otherwise is refused, not scored against the wrong image)."""
    row: dict[str, Any] = {"id": doc["question_id"], "response": response}
    for key in ("truth", "hallu"):
        if isinstance(doc.get(key), list):
            row[key] = doc[key]
    return row


BENCHMARK = Benchmark(
    name="amber", title="AMBER", read_items=read_items, answer_fields=ANSWER_FIELDS, scorer=scorer,
    metrics=metrics, prompt="{question}", max_new_tokens=512,
    comparable="AMBER's inference.py on the same responses where its spaCy model and NLTK tagger agree with the "
               "settings recorded (word_similarity, nouns); discriminative numbers exactly, with --yes-no exact",
    key="id", field="response", details=details, options=OPTIONS, from_lmms_eval=from_lmms_eval,
    data_files=lambda settings: ("annotations.json", "relation.json", "safe_words.txt",
                                 f"query/query_{settings['queries']}.json"),
    units=units)
