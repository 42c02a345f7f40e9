"""Intervals and paired tests of POPE and CHAIR scores (:mod:`vsink.evaluate.stats` over units).

* POPE: the unit is the **image** when every answer names its image (all its questions, of every
  split, are drawn together: they are not independent), else the question. Each unit's row holds,
  per split, TP, TN, FP, FN, "yes" predictions and questions; every metric and the mean over splits
  follow from the sums, exactly as :func:`vsink.evaluate.pope.score_answers` defines them. Paired
  comparisons use the questions answered under both mitigations (matched on ``question_id``);
  McNemar's exact test compares their right/wrong outcomes, per split and over all questions.
* CHAIR: the unit is the **image**, with all its captions (several when captions are sampled per
  image): captions, captions with a hallucination, mentions, hallucinated mentions, ground-truth
  classes recalled, ground-truth classes and words. Paired comparisons use the images captioned
  under both.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .stats import Bootstrap, bootstrap, interval_dict, mcnemar, paired_bootstrap, ratio

POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
CHAIR_METRICS = ("chair_s", "chair_i", "recall", "avg_len")
#: per-unit POPE counts, per split
_POPE_COUNTS = ("tp", "tn", "fp", "fn", "yes", "n")


def _pope_counts(item: dict[str, Any]) -> np.ndarray:
    label, pred = item["label"], item["parsed"]
    return np.array([label == "yes" and pred == "yes", label == "no" and pred == "no",
                     label == "no" and pred == "yes", label == "yes" and pred != "yes", pred == "yes", 1],
                    dtype=np.float64)


def _pope_statistic(num_splits: int):
    def statistic(sums: np.ndarray) -> np.ndarray:
        s = sums.reshape(*sums.shape[:-1], num_splits, len(_POPE_COUNTS))
        tp, tn, fp, fn, yes, n = (s[..., i] for i in range(len(_POPE_COUNTS)))
        precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
        per = np.stack([ratio(tp + tn, n), precision, recall, ratio(2 * precision * recall, precision + recall),
                        ratio(yes, n)], axis=-1)  # [..., splits, metrics]
        return np.concatenate([per.reshape(*per.shape[:-2], -1), per.mean(axis=-2)], axis=-1)

    return statistic


def pope_unit(items: Sequence[dict[str, Any]]) -> str:
    """``image`` where every answer names its image, else ``question``."""
    return "image" if items and all(it.get("image") for it in items) else "question"


def _pope_units(items: Sequence[dict[str, Any]], splits: list[str], unit: str) -> tuple[list[str], np.ndarray]:
    keys: dict[str, int] = {}
    rows: list[np.ndarray] = []
    width = len(splits) * len(_POPE_COUNTS)
    for it in items:
        key = str(it["image"] if unit == "image" else it["question_id"])
        if key not in keys:
            keys[key] = len(rows)
            rows.append(np.zeros(width))
        at = splits.index(it["split"]) * len(_POPE_COUNTS)
        rows[keys[key]][at:at + len(_POPE_COUNTS)] += _pope_counts(it)
    return list(keys), np.array(rows)


def _pope_shaped(values: dict[str, dict[str, float]], splits: list[str]) -> dict[str, Any]:
    """``{"splits": {split: {metric: ...}}, "mean": {metric: ...}}`` from flat ``split/metric`` names."""
    out: dict[str, Any] = {"splits": {s: {} for s in splits}, "mean": {}}
    for name, v in values.items():
        split, metric = name.split("/")
        (out["mean"] if split == "" else out["splits"][split])[metric] = v
    return out


def _names(splits: list[str]) -> list[str]:
    return [f"{s}/{m}" for s in splits for m in POPE_METRICS] + [f"/{m}" for m in POPE_METRICS]


def pope_statistics(scores: dict[str, dict[str, Any]], settings: Bootstrap) -> dict[str, Any]:
    """Adds ``intervals`` to each mitigation's POPE scores; returns ``{"statistics": settings,
    "comparisons": {mitigation: {"splits", "mean", "mcnemar", "n"}}}`` against the first."""
    names = list(scores)
    splits = sorted({it["split"] for sc in scores.values() for it in sc["items"]})
    unit = pope_unit([it for sc in scores.values() for it in sc["items"]])
    statistic = _pope_statistic(len(splits))
    for sc in scores.values():
        _, units = _pope_units(sc["items"], splits, unit)
        sc["intervals"] = _pope_shaped(interval_dict(bootstrap(units, statistic, settings), _names(splits)), splits)
    comparisons: dict[str, Any] = {}
    base = {str(it["question_id"]): it for it in scores[names[0]]["items"]}
    for name in names[1:]:
        pairs = [(base[str(it["question_id"])], it) for it in scores[name]["items"] if str(it["question_id"]) in base]
        if not pairs:
            comparisons[name] = {"n": 0}
            continue
        _, ua = _pope_units([a for a, _ in pairs], splits, unit)
        _, ub = _pope_units([b for _, b in pairs], splits, unit)
        delta = paired_bootstrap(ua, ub, statistic, settings)
        tests = {"all": mcnemar([a["parsed"] == a["label"] for a, _ in pairs],
                                [b["parsed"] == b["label"] for _, b in pairs])}
        for split in splits:
            chosen = [(a, b) for a, b in pairs if a["split"] == split]
            tests[split] = mcnemar([a["parsed"] == a["label"] for a, _ in chosen],
                                   [b["parsed"] == b["label"] for _, b in chosen])
        comparisons[name] = {**_pope_shaped(interval_dict(delta, _names(splits)), splits), "mcnemar": tests,
                             "n": len(pairs), "units": delta.n}
    return {"statistics": settings.to_dict(unit), "comparisons": comparisons}


def _chair_units(details: Sequence[dict[str, Any]]) -> tuple[list[int], np.ndarray]:
    keys: dict[int, int] = {}
    rows: list[np.ndarray] = []
    for d in details:
        image = int(d["image_id"])
        if image not in keys:
            keys[image] = len(rows)
            rows.append(np.zeros(7))
        rows[keys[image]] += [1, bool(d["hallucinated"]), len(d["mentioned"]), len(d["hallucinated"]),
                              d["recalled"], d["truth"], d["words"]]
    return list(keys), np.array(rows)


def _chair_statistic(sums: np.ndarray) -> np.ndarray:
    captions, bad, mentions, halluc, recalled, truth, words = (sums[..., i] for i in range(7))
    return np.stack([ratio(bad, captions), ratio(halluc, mentions), ratio(recalled, truth), ratio(words, captions)],
                    axis=-1)


def chair_statistics(scores: dict[str, dict[str, Any]], settings: Bootstrap) -> dict[str, Any]:
    """Adds ``intervals`` to each mitigation's CHAIR scores (images resampled with all their
    captions); returns ``{"statistics": settings, "comparisons": {mitigation: {metric: ..., "n"}}}``
    against the first, over the images captioned under both."""
    names = list(scores)
    units = {}
    for name, sc in scores.items():
        ids, rows = _chair_units(sc["captions"])
        units[name] = dict(zip(ids, rows))
        sc["intervals"] = interval_dict(bootstrap(rows, _chair_statistic, settings), CHAIR_METRICS)
    comparisons: dict[str, Any] = {}
    base = units[names[0]]
    for name in names[1:]:
        common = [i for i in units[name] if i in base]
        if not common:
            comparisons[name] = {"n": 0}
            continue
        delta = paired_bootstrap(np.array([base[i] for i in common]), np.array([units[name][i] for i in common]),
                                 _chair_statistic, settings)
        comparisons[name] = {**interval_dict(delta, CHAIR_METRICS), "n": len(common)}
    return {"statistics": settings.to_dict("image"), "comparisons": comparisons}


def statistics_line(statistics: dict[str, Any]) -> str:
    """One sentence naming how the intervals were made."""
    unit = statistics["unit"]
    units = unit[:-1] + "ies" if unit.endswith("y") else unit + "s"
    return (f"Intervals: {100 * statistics['level']:g} % {statistics['method']} over {units}, "
            f"{statistics['resamples']} resamples, seed {statistics['seed']}; Δ: the paired difference from the "
            "first mitigation on the same items, with its paired-bootstrap interval (an interval containing 0 is "
            "no demonstrated change).")
