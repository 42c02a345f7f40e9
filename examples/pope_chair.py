"""POPE and CHAIR end to end on a tiny LLaVA built offline (SYNTHETIC: random weights).

    python examples/pope_chair.py [OUT_DIR]

Writes a small COCO-format annotation file for the two bundled sample images, builds POPE
questions, runs the model with and without FastV (a resumable JSONL per mitigation), captions the
images for CHAIR, and prints the results. A random model answers by chance and writes word
salad; the point is the workflow — on real data use `vsink eval pope|chair` (docs/hallucination.md).
"""

import json
import sys
from pathlib import Path

from vsink.data.demo_images import demo_images
from vsink.data.demo_lvlm import build_tiny_llava
from vsink.evaluate.chair import score_chair
from vsink.evaluate.hallucination import CHAIR_PROMPT, POPE_PROMPT, run_items, save_results
from vsink.evaluate.pope import build_questions, score_answers
from vsink.lvlm import LVLM

out = Path(sys.argv[1] if len(sys.argv) > 1 else "vsink-pope-chair")
(out / "images").mkdir(parents=True, exist_ok=True)
names = ["person", "potted plant", "car", "dog", "bird", "boat", "bench", "umbrella", "bicycle", "kite"]
objects = {"china.jpg": ["person", "potted plant", "boat", "bird"], "flower.jpg": ["potted plant", "vase", "bench"]}
names += ["vase"]
coco = {"categories": [{"id": i + 1, "name": c} for i, c in enumerate(names)],
        "images": [{"id": i + 1, "file_name": f} for i, f in enumerate(objects)],
        "annotations": [{"image_id": i + 1, "category_id": names.index(c) + 1}
                        for i, objs in enumerate(objects.values()) for c in objs]}
(out / "instances.json").write_text(json.dumps(coco))
for im, file in zip(demo_images(), objects):
    im.image.save(out / "images" / file)

model, processor = build_tiny_llava()
lvlm = LVLM(model, processor, "tiny-llava (synthetic)")
questions = build_questions(out / "instances.json", num_images=2)
scores = {}
for mitigation in ("none", "fastv"):
    rows, _ = run_items(lvlm, questions, "question_id", out / mitigation / "answers.jsonl", images_dir=out / "images",
                        prompt=lambda q: POPE_PROMPT.format(question=q["text"]), field="answer",
                        mitigation=mitigation, settings=None, max_new_tokens=3, batch_size=6, progress=False)
    scores[mitigation] = score_answers(rows)
paths = save_results(out / "pope", "pope", {"prompt": POPE_PROMPT, "max_new_tokens": 3}, scores, {})
print(paths["markdown"].read_text())

images = [{"image_id": im["id"], "image": im["file_name"]} for im in coco["images"]]
rows, _ = run_items(lvlm, images, "image_id", out / "chair" / "generated.jsonl", images_dir=out / "images",
                    prompt=lambda _: CHAIR_PROMPT, field="caption", mitigation="none", settings=None,
                    max_new_tokens=12, batch_size=2, progress=False)
chair = score_chair(rows, out / "instances.json")
print(f"CHAIR_s {chair['chair_s']:.2f}, CHAIR_i {chair['chair_i']:.2f}, recall {chair['recall']:.2f} "
      f"over {chair['n']} captions")
