"""CHAIR's reference vocabulary: object mentions found as the reference code finds them.

Reference: ``utils/chair.py`` with ``data/synonyms.txt`` of LisaAnne/Hallucination (commit
6e4d33c4bedf6dfcd24c61bf527f40714717be47), the CHAIR of Rohrbach et al. (EMNLP 2018) that LVLM
papers use through OPERA's copy. Written here from its documented behaviour, without its code:

1. the caption is lowercased and split into tokens by NLTK's ``word_tokenize``
   (:mod:`vsink.evaluate.reference_tokenize`);
2. every token is singularised by Pattern's ``singularize``
   (:mod:`vsink.evaluate.reference_singular`);
3. left to right, a token and the next one that form one of :data:`DOUBLE_WORDS` become the word
   that entry names, and both are consumed;
4. if the words include "toilet", every "seat" is dropped;
5. the words that are entries of the synonym table are the mentions; each names the class at the
   head of its line.

Quirks that follow (all reproduced): singular "bus" becomes "bu" and is never an object, while
"buses" is; "glass" becomes "glas" (hence the table's "wine glas"); "tennis racket" becomes
"tenni racket", so only "racket" counts; "sports ball" becomes "sport ball", so only "ball"
counts; "ties" becomes "ty" (but "bow ties" still counts "bow" as a tie); "collies" and "doggies"
stay plural and are not dogs; "train track(s)" and "home plate" are joined into words the table
does not have, so they count nothing (nor a train); "baby cub" and "baby animal" likewise;
"passenger bus" is a person (no "passenger bus" entry, and "bus" → "bu"); "motor bike" joins into a
word the table only has as " motor bike" (with a leading space), so it counts nothing, and
"cheesecake" is no cake for the same reason; "dining table" and "stove top oven" are entries the
joining never produces ("table", "stove" and "oven" count instead: "stove top oven" is two
ovens); "iPhone" never matches a lowercased caption; hyphenated words ("hot-dog") are one token
and match nothing; words are counted however often they repeat, negated or not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Union

from ..errors import VsinkError
from .reference_singular import singularize
from .reference_tokenize import word_tokenize

#: the packaged copy of the reference synonym table (see its header for its provenance)
PACKAGED_SYNONYMS = Path(__file__).with_name("chair_synonyms.txt")
REFERENCE_SOURCE = "LisaAnne/Hallucination data/synonyms.txt @ 6e4d33c4bedf6dfcd24c61bf527f40714717be47"

_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
_KEPT_PAIRS = ("motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
               "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
               "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
               "mobile phone", "teddy bear", "hair drier", "potted plant", "laptop computer", "home plate",
               "train track")
#: two singularised tokens → the one word they become in the reference
DOUBLE_WORDS: dict[str, str] = {
    **{pair: pair for pair in _KEPT_PAIRS},
    **{f"{age} {animal}": animal for animal in _ANIMALS for age in ("baby", "adult")},
    "passenger jet": "jet", "passenger train": "train",
    "bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass",
}


@dataclass(frozen=True)
class SynonymTable:
    """A synonym table in the reference format: entry → class (the first entry of its line)."""

    entries: dict[str, str]
    source: str

    @property
    def classes(self) -> frozenset[str]:
        return frozenset(self.entries.values())


def read_synonyms(path: Union[str, os.PathLike, None] = None) -> SynonymTable:
    """Read a synonym table: one class a line, entries separated by ", " (comma and one space),
    the class name first; each line is stripped of surrounding white space, entries are not (so
    an entry after a double space keeps its leading space, as in the reference). Blank lines and
    lines starting with "#" are skipped. An entry on two lines names the later line's class.
    ``path=None``: the packaged reference table."""
    source = Path(path) if path is not None else PACKAGED_SYNONYMS
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise VsinkError(f"{source}: cannot read the synonym table ({getattr(e, 'strerror', None) or e})") from None
    entries: dict[str, str] = {}
    for line in text.split("\n"):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        names = line.split(", ")
        for name in names:
            entries[name] = names[0]
    if not entries:
        raise VsinkError(f"{source}: no synonym lines (one class a line: 'class, synonym, synonym')")
    return SynonymTable(entries, REFERENCE_SOURCE if path is None else str(source))


@lru_cache(maxsize=1)
def packaged_table() -> SynonymTable:
    """The packaged reference table, read once."""
    return read_synonyms()


def caption_words(caption: str) -> list[str]:
    """The caption's tokens after singularising and joining :data:`DOUBLE_WORDS` (steps 1–3)."""
    tokens = [singularize(t) for t in word_tokenize(caption.lower())]
    joined: list[str] = []
    i = 0
    while i < len(tokens):
        pair = " ".join(tokens[i:i + 2])
        if pair in DOUBLE_WORDS:
            joined.append(DOUBLE_WORDS[pair])
            i += 2
        else:
            joined.append(tokens[i])
            i += 1
    return joined


def mentions(caption: str, table: SynonymTable) -> list[tuple[str, str]]:
    """(word, class) for every object word of the caption, in order, as the reference finds them."""
    words = caption_words(caption)
    if "toilet" in words:
        words = [w for w in words if w != "seat"]
    return [(w, table.entries[w]) for w in words if w in table.entries]
