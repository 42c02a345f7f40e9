"""NLTK's ``WordNetLemmatizer().lemmatize(word)`` (nouns) for the words a vocabulary cares about,
as a table, so that scorers that lemmatise with it (Object HalBench) run without NLTK or its
WordNet data.

The lemmatiser (NLTK ``wordnet.py``: ``_morphy`` for nouns, then the shortest result, the first
of equals): a word listed in ``noun.exc`` gives the word and its listed bases; otherwise the word
and every result of one suffix substitution (:data:`SUBSTITUTIONS`, in this order); those that
are nouns of ``index.noun`` are the candidates; with none, the substitutions are applied again to
the substituted forms until some are nouns. No candidate: the word itself.

:func:`relevant_table` lists, for a set of vocabulary words, every word whose lemma differs from
it and that either is a vocabulary word or lemmatises to one, among the words reachable from the
vocabulary by one or two inverse substitutions and ``noun.exc``. A word outside the table is its
own lemma as far as that vocabulary can tell. Regenerate a table with
``python -m vsink.evaluate.wordnet_lemmas WORDNET_DIR VOCABULARY_FILE OUT.tsv`` (``WORDNET_DIR``:
WordNet 3.0's ``dict`` folder, e.g. Debian's ``/usr/share/wordnet`` from ``wordnet-base``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

from ..readers import read_lines, read_text

#: NLTK's noun substitutions, in its order
SUBSTITUTIONS = (("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
                 ("men", "man"), ("ies", "y"))


@dataclass(frozen=True)
class Nouns:
    """WordNet's noun lemmas (``index.noun``) and irregular forms (``noun.exc``: form → bases)."""

    lemmas: frozenset[str]
    exceptions: dict[str, tuple[str, ...]]


def read_wordnet(folder: Union[str, os.PathLike]) -> Nouns:
    """The nouns of a WordNet ``dict`` folder."""
    folder = Path(folder)
    # the licence lines at the top start with spaces; every other line is "lemma n ..."
    lemmas = frozenset(line.split(" ", 1)[0] for line in read_text(folder / "index.noun").split("\n")
                       if line and not line.startswith(" "))
    exceptions = {}
    for _, line in read_lines(folder / "noun.exc"):
        form, *bases = line.split()
        exceptions[form] = tuple(bases)
    return Nouns(lemmas, exceptions)


def _substitute(forms: Iterable[str]) -> list[str]:
    return [form[:len(form) - len(old)] + new for form in forms for old, new in SUBSTITUTIONS if form.endswith(old)]


def _nouns(forms: Iterable[str], nouns: Nouns) -> list[str]:
    out: list[str] = []
    for form in forms:
        if form in nouns.lemmas and form not in out:
            out.append(form)
    return out


def morphy(word: str, nouns: Nouns) -> list[str]:
    """NLTK's ``_morphy(word, NOUN)``."""
    if word in nouns.exceptions:
        return _nouns([word, *nouns.exceptions[word]], nouns)
    forms = _substitute([word])
    found = _nouns([word, *forms], nouns)
    while not found and forms:
        forms = _substitute(forms)
        found = _nouns(forms, nouns)
    return found


def lemmatize(word: str, nouns: Nouns) -> str:
    """NLTK's ``WordNetLemmatizer().lemmatize(word)``: the shortest candidate, else the word."""
    found = morphy(word, nouns)
    return min(found, key=len) if found else word


def _inflections(base: str) -> set[str]:
    """The words one substitution turns into ``base``."""
    return {base[:len(base) - len(new)] + old for old, new in SUBSTITUTIONS if base.endswith(new)}


def relevant_table(words: Iterable[str], nouns: Nouns) -> dict[str, str]:
    """word → lemma for the words that matter to a vocabulary of single ``words`` (module docstring)."""
    vocabulary = set(words)
    forms = set(vocabulary)
    for base in vocabulary:
        once = _inflections(base)
        forms |= once
        for form in once:
            forms |= _inflections(form)
    forms |= {form for form, bases in nouns.exceptions.items() if vocabulary & set(bases)}
    table = {}
    for form in sorted(forms):
        lemma = lemmatize(form, nouns)
        if lemma != form and (form in vocabulary or lemma in vocabulary):
            table[form] = lemma
    return table


def main(argv: list[str]) -> int:
    """``WORDNET_DIR VOCABULARY_FILE OUT.tsv``: the vocabulary file's words (one per line, or
    a synonym table's comma-separated lines; phrases give each of their words)."""
    if len(argv) != 3:
        print("usage: python -m vsink.evaluate.wordnet_lemmas WORDNET_DIR VOCABULARY_FILE OUT.tsv", file=sys.stderr)
        return 2
    from ..io import write_text

    words = {w for _, line in read_lines(argv[1]) if not line.startswith("#")
             for entry in line.split(",") for w in entry.split()}
    table = relevant_table(words, read_wordnet(argv[0]))
    write_text(argv[2], "".join(f"{form}\t{lemma}\n" for form, lemma in sorted(table.items())))
    print(f"wrote {len(table)} forms to {argv[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
