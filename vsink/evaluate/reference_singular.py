"""The singular of a word as the reference CHAIR code gets it from ``pattern.en.singularize``
(Pattern 3.6, the version its requirements.txt pins), reproduced offline without Pattern.

Pattern singularises every token, nouns or not, by a fixed cascade; the first step that applies
gives the answer:

1. ``a-b-c`` whose second part is a preposition ("mothers-in-law"): the first part is singularised.
2. A word ending in ``'``: the singular of the rest plus ``'s``.
3. Unchanged if the word is the *ending* of one of Pattern's uninflected or uncountable words
   (so "ice" stays, being the end of "advice", and "ears", the end of "shears").
4. Unchanged if it ends with one of Pattern's "-ie" nouns plus "s" ("collies", "doggies"):
   Pattern 3.6 returns such plurals as they are (Pattern 2.6 returned the "-ie" noun instead).
5. Irregular plural endings replaced ("men" → "man", so "women" → "woman"; "people" → "person";
   also "our" → "my", so "four" → "fmy").
6. The first matching suffix rule of :data:`_RULES`; the last one drops any final "s", which is
   why "bus" becomes "bu", "glass" "glas", "tennis" "tenni" and "this" "thi" in the reference.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable, Union

_PREPOSITIONS = frozenset((
    "about", "before", "during", "of", "till", "above", "behind", "except", "off", "to", "across", "below",
    "for", "on", "under", "after", "beneath", "from", "onto", "until", "among", "beside", "in", "out", "unto",
    "around", "besides", "into", "over", "upon", "at", "between", "near", "since", "with", "athwart",
    "betwixt", "beyond", "but", "by"))
_UNINFLECTED = (
    "bison", "debris", "headquarters", "pincers", "trout", "bream", "diabetes", "herpes", "pliers", "tuna",
    "breeches", "djinn", "high-jinks", "proceedings", "whiting", "britches", "eland", "homework", "rabies",
    "wildebeest", "carp", "elk", "innings", "salmon", "chassis", "flounder", "jackanapes", "scissors",
    "christmas", "gallows", "mackerel", "series", "clippers", "georgia", "measles", "shears", "cod",
    "graffiti", "mews", "species", "contretemps", "mumps", "swine", "corps", "news", "swiss")
_UNCOUNTABLE = (
    "advice", "equipment", "happiness", "luggage", "news", "software", "bread", "fruit", "information",
    "mathematics", "progress", "understanding", "butter", "furniture", "ketchup", "mayonnaise", "research",
    "water", "cheese", "garbage", "knowledge", "meat", "rice", "electricity", "gravel", "love", "mustard",
    "sand")
#: every ending (suffix, the empty one included) of an uninflected or uncountable word
_KEEP = frozenset(w[i:] for w in _UNINFLECTED + _UNCOUNTABLE for i in range(len(w) + 1))
#: Pattern's "-ie" nouns; "^pie" and "^tie" are listed with a literal caret, so they never match
_IE_NOUNS = (
    "alergie", "cutie", "hoagie", "newbie", "softie", "veggie", "auntie", "doggie", "hottie", "nightie",
    "sortie", "weenie", "beanie", "eyrie", "indie", "oldie", "stoolie", "yuppie", "birdie", "freebie", "junkie",
    "^pie", "sweetie", "zombie", "bogie", "goonie", "laddie", "pixie", "techie", "bombie", "groupie", "laramie",
    "quickie", "^tie", "collie", "hankie", "lingerie", "reverie", "toughie", "cookie", "hippie", "meanie",
    "rookie", "valkyrie")
#: irregular plural endings; none is the ending of another, so their order does not matter
_IRREGULAR = {
    "atlantes": "atlas", "atlases": "atlas", "axes": "axe", "beeves": "beef", "brethren": "brother",
    "children": "child", "corpora": "corpus", "corpuses": "corpus", "ephemerides": "ephemeris", "feet": "foot",
    "ganglia": "ganglion", "geese": "goose", "genera": "genus", "genii": "genie", "graffiti": "graffito",
    "helves": "helve", "kine": "cow", "leaves": "leaf", "loaves": "loaf", "men": "man", "mongooses": "mongoose",
    "monies": "money", "moves": "move", "mythoi": "mythos", "numena": "numen", "occipita": "occiput",
    "octopodes": "octopus", "opera": "opus", "opuses": "opus", "our": "my", "oxen": "ox", "penes": "penis",
    "penises": "penis", "people": "person", "sexes": "sex", "soliloquies": "soliloquy", "teeth": "tooth",
    "testes": "testis", "trilbys": "trilby", "turves": "turf", "zoa": "zoon"}

_Replacement = Union[str, Callable[[re.Match[str]], str]]
#: suffix rules in Pattern's order; the first whose pattern is found is applied (once)
_RULES: tuple[tuple[re.Pattern[str], _Replacement], ...] = tuple((re.compile(p, re.I), r) for p, r in (
    (r"(.)ae$", r"\1a"),
    (r"(.)itis$", r"\1itis"),
    (r"(.)eaux$", r"\1eau"),
    (r"(quiz)zes$", r"\1"),
    (r"(matr)ices$", r"\1ix"),
    (r"(ap|vert|ind)ices$", r"\1ex"),
    (r"^(ox)en", r"\1"),  # not anchored at the end
    (r"(alias|status)es$", r"\1"),
    (r"([octp|vir])i$", r"\1us"),  # a character class in Pattern: any of o c t p | v i r, then "i"
    (r"(cris|ax|test)es$", r"\1is"),
    (r"(shoe)s$", r"\1"),
    (r"(o)es$", r"\1"),
    (r"(bus)es$", r"\1"),
    (r"([m|l])ice$", r"\1ouse"),  # "slice" → "slouse", "police" → "polouse"
    (r"(x|ch|ss|sh)es$", r"\1"),
    (r"(m)ovies$", r"\1ovie"),
    (r"(.)ombies$", r"\1ombie"),
    (r"(s)eries$", r"\1eries"),
    (r"([^aeiouy]|qu)ies$", r"\1y"),  # also "ties" → "ty", "pies" → "py"
    (r"([aeo]l)ves$", r"\1f"),
    (r"([^d]ea)ves$", r"\1f"),
    (r"arves$", "arf"),
    (r"erves$", "erve"),
    (r"([nlw]i)ves$", r"\1fe"),
    (r"([lr])ves$", r"\1f"),
    (r"([aeo])ves$", r"\1ve"),
    (r"(sive)s$", r"\1"),
    (r"(tive)s$", r"\1"),
    (r"(hive)s$", r"\1"),
    (r"([^f])ves$", r"\1fe"),
    (r"(^analy)ses$", r"\1sis"),
    (r"((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$",
     lambda m: m.group(1) + (m.group(2) or "") + "sis"),
    (r"(.)opses$", r"\1opsis"),
    (r"(.)yses$", r"\1ysis"),
    (r"(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
    (r"(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"),
    (r"(.)oses$", r"\1osis"),
    (r"([ti])a$", r"\1um"),  # "pasta" → "pastum"
    (r"(n)ews$", r"\1ews"),
    (r"s$", ""),
))


@lru_cache(maxsize=1 << 16)
def singularize(word: str) -> str:
    """Pattern 3.6's ``singularize(word)`` for one token (see the module docstring)."""
    if "-" in word:
        parts = word.split("-")
        if parts[1] in _PREPOSITIONS:
            return singularize(parts[0]) + "-" + "-".join(parts[1:])
    if word.endswith("'"):
        return singularize(word[:-1]) + "'s"
    lower = word.lower()
    if lower in _KEEP:
        return word
    if any(lower.endswith(ie + "s") for ie in _IE_NOUNS):
        return lower
    for plural, single in _IRREGULAR.items():
        if lower.endswith(plural):
            return re.sub(plural + "$", single, word, flags=re.I)
    for pattern, replacement in _RULES:
        if pattern.search(word):
            return pattern.sub(replacement, word, count=1)
    return word
