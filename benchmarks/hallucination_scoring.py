"""Scoring speed and CHAIR vocabulary parity.

Speed: CHAIR on 5,000 captions with each vocabulary (target < 2 s) and POPE on 9,000 answers
(target < 0.5 s), one thread. Captions and answers are generated (seeded) from the vsink CHAIR
vocabulary and typical answer forms; the ground truth is random COCO classes per image.

Parity: on the 118 captions of tests/data/chair_captions.jsonl (objects, plurals, synonyms,
two-word phrases, commas, negations, the reference's quirks), CHAIR_i/CHAIR_s of the hand-derived
reference mentions, of ``--vocabulary reference`` and of ``--vocabulary vsink``, and the captions
where the two vocabularies disagree.

    python benchmarks/hallucination_scoring.py
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from vsink.evaluate.chair import load_vocabulary, score_captions
from vsink.evaluate.chair_words import SYNONYMS
from vsink.evaluate.pope import SPLITS, score_answers

FILLER = "a the of with on in near and is are there two several small large red blue sitting standing".split()
CAPTIONS = Path(__file__).resolve().parent.parent / "tests" / "data" / "chair_captions.jsonl"


def speed() -> None:
    rng = random.Random(0)
    classes = list(SYNONYMS)
    surfaces = [w for ws in SYNONYMS.values() for w in ws]
    truth = {i: set(rng.sample(classes, 4)) for i in range(5000)}
    captions = []
    for i in range(5000):
        words = [rng.choice(FILLER) for _ in range(rng.randint(40, 90))]
        for _ in range(rng.randint(3, 10)):
            words.insert(rng.randrange(len(words)), rng.choice(surfaces) + rng.choice(["", "s"]))
        captions.append({"image_id": i, "caption": " ".join(words).capitalize() + "."})
    forms = ["Yes.", "No.", "yes", "no", "Yes, there is a dog in the image.", "No, there is not.", "", "I don't know"]
    answers = [{"split": SPLITS[i % 3], "label": rng.choice(["yes", "no"]), "answer": rng.choice(forms)}
               for i in range(9000)]
    words = sum(len(c["caption"].split()) for c in captions)
    for name in ("reference", "vsink"):
        t0 = time.perf_counter()
        chair = score_captions(captions, truth, vocabulary=name)
        print(f"CHAIR ({name}): 5,000 captions ({words / 5000:.0f} words each, {chair['mentions']} mentions) in "
              f"{time.perf_counter() - t0:.2f} s (target < 2 s)")
    t0 = time.perf_counter()
    score_answers(answers, "official")
    t_pope = time.perf_counter() - t0
    t0 = time.perf_counter()
    score_answers(answers, "strict")
    print(f"POPE:  9,000 answers in {t_pope:.3f} s official, {time.perf_counter() - t0:.3f} s strict "
          "(target < 0.5 s)")


def parity() -> None:
    rows = [json.loads(line) for line in CAPTIONS.read_text(encoding="utf-8").split("\n") if line]
    truth = {r["image_id"]: set(r["objects"]) for r in rows}
    generated = [{"image_id": r["image_id"], "caption": r["caption"]} for r in rows]
    hand_halluc = [[c for _, c in r["reference"] if c not in truth[r["image_id"]]] for r in rows]
    hand_mentions = sum(len(r["reference"]) for r in rows)
    print(f"\nCHAIR parity on {len(rows)} captions ({CAPTIONS.name}):")
    print(f"  reference, derived by hand: CHAIR_i {sum(map(len, hand_halluc)) / hand_mentions:.4f}  "
          f"CHAIR_s {sum(map(bool, hand_halluc)) / len(rows):.4f}  ({hand_mentions} mentions)")
    scores = {name: score_captions(generated, truth, vocabulary=load_vocabulary(name)) for name in ("reference", "vsink")}
    for name, s in scores.items():
        print(f"  --vocabulary {name:9}: CHAIR_i {s['chair_i']:.4f}  CHAIR_s {s['chair_s']:.4f}  "
              f"recall {s['recall']:.4f}  ({s['mentions']} mentions)")
    hand_equal = sum([list(m) for m in zip(d["mentioned_words"], d["mentioned"])] == r["reference"]
                     for d, r in zip(scores["reference"]["captions"], rows))
    print(f"  reference == hand-derived mentions: {hand_equal} of {len(rows)} captions")
    ref, mine = scores["reference"]["captions"], scores["vsink"]["captions"]
    differ = [i for i, (a, b) in enumerate(zip(ref, mine)) if sorted(a["mentioned"]) != sorted(b["mentioned"])]
    halluc = [i for i, (a, b) in enumerate(zip(ref, mine)) if sorted(a["hallucinated"]) != sorted(b["hallucinated"])]
    print(f"  vsink vs reference: mentioned classes differ on {len(differ)} captions, hallucinated classes on "
          f"{len(halluc)}")
    for i in differ:
        print(f"    {rows[i]['caption']!r}: reference {ref[i]['mentioned']} | vsink {mine[i]['mentioned']}")


def main() -> None:
    torch.set_num_threads(1)
    speed()
    parity()


if __name__ == "__main__":
    main()
