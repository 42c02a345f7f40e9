"""Scoring speed: CHAIR on 5,000 captions (target < 2 s) and POPE on 9,000 answers (target < 0.5 s),
one thread. Captions and answers are generated (seeded) from the CHAIR vocabulary and typical
answer forms; the ground truth is random COCO classes per image.

    python benchmarks/hallucination_scoring.py
"""

from __future__ import annotations

import random
import time

import torch

from vsink.evaluate.chair import score_captions
from vsink.evaluate.chair_words import SYNONYMS
from vsink.evaluate.pope import SPLITS, score_answers

FILLER = "a the of with on in near and is are there two several small large red blue sitting standing".split()


def main() -> None:
    torch.set_num_threads(1)
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

    t0 = time.perf_counter()
    chair = score_captions(captions, truth)
    t_chair = time.perf_counter() - t0
    t0 = time.perf_counter()
    score_answers(answers, "official")
    t_pope = time.perf_counter() - t0
    t0 = time.perf_counter()
    score_answers(answers, "strict")
    t_strict = time.perf_counter() - t0
    words = sum(len(c["caption"].split()) for c in captions)
    print(f"CHAIR: 5,000 captions ({words / 5000:.0f} words each, {chair['mentions']} mentions) in {t_chair:.2f} s "
          f"(target < 2 s)")
    print(f"POPE:  9,000 answers in {t_pope:.3f} s official, {t_strict:.3f} s strict (target < 0.5 s)")


if __name__ == "__main__":
    main()
