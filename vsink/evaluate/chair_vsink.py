"""CHAIR's ``vsink`` vocabulary: object mentions found with vsink's own table
(:mod:`vsink.evaluate.chair_words`), offline and deterministic.

* Segments: the caption is cut at punctuation (``. , ; : ! ? ( ) [ ] { } / |``, dashes, ellipsis);
  no phrase spans a cut, so "microwave, oven" is a microwave and an oven.
* Words: lowercase runs of Unicode letters, composed to NFC ("café" and "naïve" are one word
  each; digits and "_" are not letters; possessive "'s" dropped; a hyphen separates words, so
  "hot-dog" is "hot dog"), singularised by a vocabulary-guided rule set — irregular plurals from a table, then
  "-ies" → "-y", "-ves" → "-f"/"-fe", "-es" → "", "-s" → "", each accepted only if it yields a word
  of the vocabulary (so "bus" stays "bus", and "snow" or "glass" are never mangled into class
  words). No NLTK or Pattern: nothing is downloaded at run time.
* Mentions: longest phrase first within a segment (up to :data:`LONGEST` words) over the table
  built from :data:`~vsink.evaluate.chair_words.SYNONYMS`,
  :data:`~vsink.evaluate.chair_words.MODIFIERS` and :data:`~vsink.evaluate.chair_words.COMPOUNDS`;
  a compound that names no COCO object ("bus stop", "baseball field") consumes its words and
  counts nothing. If a caption mentions a toilet, its "seat" mentions are dropped. Repeated and
  negated mentions count.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Optional

from .chair_words import COMPOUNDS, IRREGULAR, MODIFIERS, SYNONYMS

WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
BOUNDARY = re.compile(r"[.,;:!?()\[\]{}/|…—–]|--")


def words(text: str) -> list[str]:
    """Lowercase words (runs of Unicode letters, composed to NFC) of a caption, possessive 's removed."""
    return [w[:-2] if w.endswith("'s") else w for w in WORD.findall(unicodedata.normalize("NFC", text).lower())]


@lru_cache(maxsize=1)
def phrase_table() -> tuple[dict[str, Optional[str]], frozenset[str], int]:
    """(phrase → class or None, words the singulariser may produce, longest phrase in words)."""
    table: dict[str, Optional[str]] = {}
    for cls, phrases in SYNONYMS.items():
        for p in phrases:
            table[" ".join(words(p))] = cls
    for modifier, classes in MODIFIERS.items():
        for cls in classes:
            for p in SYNONYMS[cls]:
                table[f"{modifier} {' '.join(words(p))}"] = cls
    for p, cls in COMPOUNDS.items():
        table[" ".join(words(p))] = cls
    vocab = frozenset(w for phrase in table for w in phrase.split()) | frozenset(IRREGULAR.values())
    return table, vocab, max(len(p.split()) for p in table)


@lru_cache(maxsize=1 << 16)
def singular(word: str) -> str:
    """Vocabulary-guided singular of one lowercase word (see the module docstring)."""
    vocab = phrase_table()[1]
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
    table, _, longest = phrase_table()
    found: list[tuple[str, str]] = []
    for segment in BOUNDARY.split(caption.lower()):
        toks = [singular(w) for w in words(segment)]
        i = 0
        while i < len(toks):
            for n in range(min(longest, len(toks) - i), 0, -1):
                phrase = " ".join(toks[i:i + n])
                if phrase in table:
                    cls = table[phrase]
                    if cls is not None:
                        found.append((phrase, cls))
                    i += n
                    break
            else:
                i += 1
    if any(cls == "toilet" for _, cls in found):
        found = [(p, c) for p, c in found if p != "seat"]
    return found
