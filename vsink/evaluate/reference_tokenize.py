"""Word tokens as the reference CHAIR code gets them from ``nltk.word_tokenize`` (NLTK 3.2.5, the
version its requirements.txt pins), reproduced offline: no NLTK, no Punkt model download.

NLTK's ``word_tokenize`` splits the text into sentences with the Punkt model, then runs the
Treebank word rules on each sentence. Behaviour reproduced here:

* Sentences: a period that ends a word (not after another period) and is followed by white space
  or the end of the text — optionally with closing brackets or quotes in between — ends a
  sentence, and so is split off as its own token. Punkt keeps the period on the tokens it takes
  for abbreviations ("st.", "dr.", "u.s."), initials ("j.") and numbers ("2."); those tokens split
  here are never COCO words, so the object words found are the same, only the token count differs.
  A period inside a word run ("dog.cat") stays, as in NLTK.
* Treebank rules on each sentence: ``"`` becomes `````` / ``''``; ``, :`` split off unless a digit
  follows; ``...``, ``; @ # $ % &``, ``? !``, brackets ``( ) [ ] { } < >`` and ``--`` are tokens;
  ``'`` before a space, ``'s 'm 'd 'll 're 've n't`` are split from their word; curly quotes and
  guillemets are tokens. Hyphens, slashes and other characters stay inside the word ("hot-dog" is
  one token). Not reproduced: the Treebank contraction splits ("cannot" → "can not",
  "gonna" → "gon na"), which only change the token count.
"""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"(?<=[^.\s])\.[\]\)}>\"'»”’]*(?=\s|$)")
_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), r) for p, r in (
    # opening quotes
    (r"([«“‘])", r" \1 "),
    (r'^"', "``"),
    (r"(``)", r" \1 "),
    (r'([ (\[{<])"', r"\1 `` "),
    # punctuation (the first rule: the sentence's final period and the closers after it)
    (r"([^.])(\.)([\]\)}>\"'»”’ ]*)\s*$", r"\1 \2 \3 "),
    (r"([:,])([^\d])", r" \1 \2"),
    (r"([:,])$", r" \1 "),
    (r"\.\.\.", r" ... "),
    (r"[;@#$%&]", r" \g<0> "),
    (r"[?!]", r" \g<0> "),
    (r"([^'])' ", r"\1 ' "),
    (r"[\]\[(){}<>]", r" \g<0> "),
    (r"--", r" -- "),
))
_ENDING_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"([»”’])", r" \1 "),
    (r'"', " '' "),
    (r"(\S)('')", r"\1 \2 "),
    (r"([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 "),
    (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 "),
))


def sentences(text: str) -> list[str]:
    """``text`` cut after every sentence-final period (see the module docstring)."""
    parts, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        parts.append(text[start:m.end()])
        start = m.end()
    parts.append(text[start:])
    return [p for p in parts if p.strip()]


def _treebank(sentence: str) -> list[str]:
    for pattern, repl in _RULES:
        sentence = pattern.sub(repl, sentence)
    sentence = f" {sentence} "
    for pattern, repl in _ENDING_RULES:
        sentence = pattern.sub(repl, sentence)
    return sentence.split()


def word_tokenize(text: str) -> list[str]:
    """Tokens of ``text`` as NLTK 3.2.5's ``word_tokenize`` gives them (see the module docstring)."""
    return [tok for sentence in sentences(text) for tok in _treebank(sentence)]
