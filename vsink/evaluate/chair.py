"""CHAIR (Rohrbach et al. 2018): object hallucination in captions, offline.

* Words: lowercase letter runs (possessive "'s" dropped), singularised by a vocabulary-guided
  rule set — irregular plurals from a table, then "-ies" → "-y", "-ves" → "-f"/"-fe", "-es" → "",
  "-s" → "", each accepted only if it yields a word of the CHAIR vocabulary (so "snow" or "glass"
  are never mangled into class words). No NLTK or any run-time data download: the reference code
  needs NLTK data fetched at run time, and its lemmas vary by version; a rule set limited to the
  vocabulary is deterministic and cannot invent objects.
* Mentions: longest match first over the singularised words (3-, 2-, then 1-word phrases of
  :data:`vsink.evaluate.chair_words.SYNONYMS`), so "hot dog", "teddy bear", "baby bird" (→ bird),
  "toilet seat" (→ toilet) win over their parts; if a caption mentions a toilet, its "seat"
  mentions are dropped. Repeated and negated mentions count.
* Ground truth of an image: its instance-annotation classes ∪ the classes mentioned in its
  reference captions (when given).
* CHAIR_i = hallucinated mentions / mentions; CHAIR_s = captions with ≥ 1 hallucinated mention /
  captions; recall = Σ |mentioned ∩ ground truth| / Σ |ground truth| over captions; avg_len =
  mean words per caption. 0 where a denominator is 0.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from ..errors import VsinkError
from .chair_words import IRREGULAR, SYNONYMS
from .coco import read_coco_objects

WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Lowercase words of a caption, possessive 's removed."""
    return [w[:-2] if w.endswith("'s") else w for w in WORD.findall(text.lower())]


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[frozenset[str], dict[str, str], int]:
    vocab = {w for phrases in SYNONYMS.values() for p in phrases for w in words(p)} | set(IRREGULAR.values())
    table: dict[str, str] = {}
    for cls, phrases in SYNONYMS.items():
        for p in phrases:
            table[" ".join(words(p))] = cls
    return frozenset(vocab), table, max(len(k.split()) for k in table)


@lru_cache(maxsize=1 << 16)
def singular(word: str) -> str:
    """Vocabulary-guided singular of one lowercase word (see the module docstring)."""
    vocab = _vocabulary()[0]
    if word in IRREGULAR:
        return IRREGULAR[word]
    if word in vocab:
        return word
    candidates = []
    if word.endswith("ies"):
        candidates.append(word[:-3] + "y")
    if word.endswith("ves"):
        candidates += [word[:-3] + "f", word[:-3] + "fe"]
    if word.endswith("es"):
        candidates.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss"):
        candidates.append(word[:-1])
    return next((c for c in candidates if c in vocab), word)


def mentions(caption: str) -> list[tuple[str, str]]:
    """(surface phrase, COCO class) for every object mention, in order."""
    _, table, longest = _vocabulary()
    toks = [singular(w) for w in words(caption)]
    found: list[tuple[str, str]] = []
    i = 0
    while i < len(toks):
        for n in range(min(longest, len(toks) - i), 0, -1):
            phrase = " ".join(toks[i:i + n])
            if phrase in table:
                found.append((phrase, table[phrase]))
                i += n
                break
        else:
            i += 1
    if any(cls == "toilet" for _, cls in found):
        found = [(p, c) for p, c in found if p != "seat"]
    return found


def ground_truth(annotations: Union[str, os.PathLike, dict],
                 captions: Union[None, str, os.PathLike, dict] = None) -> dict[int, set[str]]:
    """Image id → set of COCO classes (instances ∪ classes mentioned in reference captions)."""
    coco = read_coco_objects(annotations)
    truth = {i: set(objs) for i, objs in coco.objects.items()}
    where = coco.where
    unknown = sorted(c for objs in truth.values() for c in objs if c not in SYNONYMS)
    if unknown:
        raise VsinkError(f"{where}: categories {sorted(set(unknown))[:5]} are not COCO classes")
    if captions is not None:
        cwhere = "captions JSON" if isinstance(captions, dict) else str(captions)
        try:
            cdata = captions if isinstance(captions, dict) else json.loads(Path(captions).read_text())
            for ann in cdata["annotations"]:
                truth.setdefault(int(ann["image_id"]), set()).update(c for _, c in mentions(str(ann["caption"])))
        except OSError as e:
            raise VsinkError(f"{cwhere}: cannot read ({e.strerror or e})") from None
        except (ValueError, KeyError, TypeError) as e:
            raise VsinkError(f"{cwhere}: not a COCO captions file ({e!r})") from None
    return truth


def score_captions(generated: Iterable[dict[str, Any]], truth: dict[int, set[str]],
                   where: str = "generated captions") -> dict[str, Any]:
    """CHAIR_i, CHAIR_s, recall, avg_len and per-caption details (see the module docstring)."""
    details, n_mentions, n_halluc, n_bad, hit, gt_total, lengths = [], 0, 0, 0, 0, 0, []
    for i, row in enumerate(generated):
        try:
            image_id, caption = int(row["image_id"]), str(row["caption"])
        except (KeyError, TypeError, ValueError):
            raise VsinkError(f"{where}: item {i} needs image_id and caption") from None
        if image_id not in truth:
            raise VsinkError(f"{where}: item {i}: image_id {image_id} is not in the annotations")
        gt = truth[image_id]
        found = mentions(caption)
        halluc = [(p, c) for p, c in found if c not in gt]
        n_mentions += len(found)
        n_halluc += len(halluc)
        n_bad += bool(halluc)
        hit += len({c for _, c in found} & gt)
        gt_total += len(gt)
        lengths.append(len(words(caption)))
        details.append({"image_id": image_id, "mentioned": [c for _, c in found],
                        "hallucinated": [c for _, c in halluc], "mentioned_words": [p for p, _ in found],
                        "hallucinated_words": [p for p, _ in halluc]})
    if not details:
        raise VsinkError(f"{where}: no captions to score")
    return {"chair_i": n_halluc / n_mentions if n_mentions else 0.0, "chair_s": n_bad / len(details),
            "recall": hit / gt_total if gt_total else 0.0, "avg_len": sum(lengths) / len(lengths),
            "n": len(details), "mentions": n_mentions, "hallucinated_mentions": n_halluc, "captions": details}


def score_chair(generated: Iterable[dict[str, Any]], annotations: Union[str, os.PathLike, dict],
                captions: Optional[Union[str, os.PathLike, dict]] = None) -> dict[str, Any]:
    """Score generated captions against COCO annotations (and reference captions)."""
    return score_captions(generated, ground_truth(annotations, captions))
