"""Reports as a reader sees them, checked on the rendered HTML: the scan report's sections, the
side-by-side comparisons (registers apply, finetune), POPE / CHAIR and dense pages."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from vsink.cli import main
from vsink.evaluate.chair import score_chair
from vsink.evaluate.dense import DenseResult
from vsink.evaluate.hallucination import save_results
from vsink.evaluate.pope import score_answers
from vsink.export.hallucination_report import caption_cell


class Page(HTMLParser):
    """Headings with the images and tables under each, and the text of every element class."""

    def __init__(self, text: str):
        super().__init__()
        self.sections: dict[str, dict[str, int]] = {}
        self.current = None
        self.heading = None
        self.classes: dict[str, list[str]] = {}
        self.stack: list = []
        self.cells: list[list[str]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("h1", "h2"):
            self.heading = ""
        if tag == "img" and self.current is not None:
            self.sections[self.current]["img"] += 1
        if tag == "table" and self.current is not None:
            self.sections[self.current]["table"] += 1
        if tag == "tr":
            self.cells.append([])
        self.stack.append((tag, attrs.get("class"), []))

    def handle_endtag(self, tag):
        if tag in ("h1", "h2") and self.heading is not None:
            self.current = self.heading.strip()
            self.sections[self.current] = {"img": 0, "table": 0}
            self.heading = None
        while self.stack:
            t, cls, text = self.stack.pop()
            joined = "".join(text)
            if cls:
                self.classes.setdefault(cls, []).append(joined)
            if t in ("td", "th") and self.cells:
                self.cells[-1].append(joined)
            if self.stack:
                self.stack[-1][2].append(joined)
            if t == tag:
                break

    def handle_data(self, data):
        if self.heading is not None:
            self.heading += data
        if self.stack:
            self.stack[-1][2].append(data)

    def section(self, prefix: str) -> dict[str, int]:
        return next(v for k, v in self.sections.items() if k.startswith(prefix))


def test_scan_report_shows_massive_activations_heads_and_every_blocks_norms(demo_scan):
    page = Page((demo_scan / "report.html").read_text())
    assert "Synthetic demo model." in page.classes["banner"][0]
    scan = json.loads((demo_scan / "scan.json").read_text())
    assert scan["massive"] and page.section("Massive activations") == {"img": 1, "table": 1}
    assert page.section("Per head")["img"] == 2  # sink share and entropy, block x head
    assert page.section("Norm maps at every block")["img"] == len(scan["images"])
    sinks = page.section("Strongest sinks")
    assert sinks["table"] == 1
    rows = [r for r in page.cells if len(r) == 8 and r[0].startswith("sklearn:")]
    keys = [(r[0], r[1]) for r in rows]
    assert rows and len(keys) == len(set(keys))  # one row per (image, token), not one per block
    per_image = {img: sum(k[0] == img for k in keys) for img, _ in keys}
    assert max(per_image.values()) <= 4 and len(per_image) == 2  # both images, not 30 rows of one


def test_registers_apply_writes_one_side_by_side_report(demo_registers):
    """``registers apply`` on the demo (run once for the suite: conftest.py)."""
    _, folder, printed = demo_registers
    assert "compare.html (side by side)" in printed
    page = Page((folder / "compare.html").read_text())
    summary = next(r for r in page.cells if r and r[0] == "outlier tokens")
    before = json.loads((folder / "before" / "scan.json").read_text())["high_norm"]["tokens_total"]
    after = json.loads((folder / "after" / "scan.json").read_text())["high_norm"]["tokens_total"]
    assert summary[1:3] == [str(before), str(after)] and summary[3] == f"−{before - after}"
    assert page.section("Per block, all runs on one axis")["img"] == 4
    assert page.section("PCA of patch features")["img"] == 1
    assert page.section("Norm maps at every block")["img"] == 2 * 2  # two images x (before, after)
    assert page.section("Per image")["table"] == 1


def test_comparison_says_which_images_its_maps_show_and_lists_every_image(tmp_path, demo_registers):
    """Six photos, four drawn: the page says "the first 4 of 6" and its per-image table has all six."""
    from vsink.export.compare import MAX_IMAGES

    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(MAX_IMAGES + 2):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    neurons, _, _ = demo_registers  # the demo's planted neurons, found on its demo images
    assert main(["registers", "apply", str(folder), "--neurons", str(neurons), "--no-progress",
                 "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "compare.html").read_text()
    page = Page(text)
    assert f"the first {MAX_IMAGES} of {MAX_IMAGES + 2} images" in text
    assert page.section("Norm maps at every block")["img"] == 2 * MAX_IMAGES
    listed = {r[0] for r in page.cells if r and r[0].endswith(".png")}
    assert listed == {str(folder / f"p{i}.png") for i in range(MAX_IMAGES + 2)}


def test_finetune_report_has_training_curves_and_both_models(tmp_path):
    config = Path(__file__).parents[1] / "configs" / "posthoc.yaml"
    assert main(["finetune", "--config", str(config), "train.steps=3", "train.eval_every=3",
                 "data.num_images=8", "data.eval_images=2", f"out={tmp_path}", "--no-progress"]) == 0
    page = Page((tmp_path / "report.html").read_text())
    assert page.section("Training curves")["img"] == 1
    assert page.section("Summary")["table"] == 1
    header = next(r for r in page.cells if r and r[0] == "metric" and len(r) > 2)
    # the original (with its outliers), the test-time-register teacher, the fine-tuned student
    assert [h for h in header if not h.startswith("Δ")] == ["metric", "original", "teacher (test-time registers)",
                                                          "fine-tuned"]
    assert "Original, teacher (test-time registers) and fine-tuned, side by side" in page.sections
    assert page.section("PCA of patch features")["img"] == 1


def pope_answers(answer: str) -> list[dict]:
    return [{"split": split, "label": "yes" if i % 2 else "no", "answer": answer}
            for split in ("adversarial", "random") for i in range(24)]


def test_pope_html_counts_unparseable_answers_instead_of_zeros(tmp_path):
    """--parser strict on 24 answers per split that are all 'Maybe': every metric is 0, which the
    markdown showed as 0.00 everywhere; the page says n/a and counts 24 / 24."""
    scores = {"none": score_answers(pope_answers("Maybe."), "strict"),
              "var": score_answers(pope_answers("Yes"), "strict")}
    paths = save_results(tmp_path, "pope", {"parser": "strict"}, scores, {})
    page = Page(paths["html"].read_text())
    assert "24 of 24" in page.classes["banner"][0] and "strict" in page.classes["banner"][0]
    for split in ("split adversarial", "split random"):
        assert page.section(split)["table"] == 1
    rows = [r for r in page.cells if r and r[0] in ("accuracy (%)", "unparseable answers")]
    assert all(r[1] == "n/a: all unparseable" for r in rows if r[0] == "accuracy (%)")
    assert all(r[2].startswith("50.00 [") for r in rows if r[0] == "accuracy (%)")  # 'Yes' to 12 yes, 12 no
    assert [r[1] for r in rows if r[0] == "unparseable answers"] == ["24 / 24", "24 / 24", "48 / 48"]
    assert "none: unparseable answers (counted wrong, not yes): adversarial 24/24, random 24/24" in \
        paths["markdown"].read_text()


def coco() -> dict:
    return {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
            "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "person"}, {"id": 3, "name": "cat"}],
            "annotations": [{"image_id": 1, "category_id": 1}, {"image_id": 1, "category_id": 2},
                            {"image_id": 2, "category_id": 3}]}


def test_chair_html_marks_hallucinated_words_per_caption(tmp_path):
    gen = [{"image_id": 1, "caption": "A man walks two dogs past a cat."},
           {"image_id": 2, "caption": "A cat on the grass."}]
    other = [{"image_id": 1, "caption": "A dog."}, {"image_id": 2, "caption": "A dog and a cat."}]
    scores = {"none": score_chair(gen, coco(), vocabulary="vsink"), "pai": score_chair(other, coco(), vocabulary="vsink")}
    assert scores["none"]["captions"][0]["caption"] == gen[0]["caption"]
    page = Page(save_results(tmp_path, "chair", {"vocabulary": "vsink", "synonyms": "vsink"}, scores, {})["html"].read_text())
    # after the legend's two marks: image 1 under none, pai, then image 2 under none, pai
    assert page.classes["halluc"][1:] == ["cat", "dog"]  # image 1: the cat; image 2 under pai: the dog
    assert page.classes["ok"][1:] == ["man", "dogs", "dog", "cat", "cat"]
    score_row = next(r for r in page.cells if r and r[0] == "CHAIR_s (%)")
    # none: image 1 hallucinates, image 2 not; pai: the reverse. Two images resampled: both image 1
    # (1/4: 100 %), both image 2 (1/4: 0 %), one of each (1/2: 50 %), so the 95 % interval is
    # [0, 100]; the paired difference pai − none is −100 for image 1 twice, +100 for image 2
    # twice and 0 otherwise: ±0.00 with the interval [−100, +100], neutral (it contains 0)
    assert score_row[1:4] == ["50.00 [0.00, 100.00]", "50.00 [0.00, 100.00]", "±0.00 [−100.00, +100.00]"]
    cell = caption_cell({"caption": "Two <b>dogs</b>", "mentioned": ["dog"], "hallucinated": ["dog"],
                         "mentioned_words": ["dog"]})
    assert "&lt;b&gt;<mark class='halluc'>dogs</mark>&lt;/b&gt;" in cell  # escaped text, the word marked


def test_dense_html_renders_markdown_banner_and_figures(tmp_path):
    assert main(["eval", "dense", "--synthetic-images", "6", "--epochs", "2", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    text = (tmp_path / "results.html").read_text()
    assert "`" not in re.sub(r"<style>.*?</style>", "", text, flags=re.S)
    page = Page(text)
    assert "Synthetic demo model." in page.classes["banner"][0]
    assert page.section("Per-class IoU")["img"] == 1
    assert page.section("Artifacts per block")["img"] == 2
    assert page.section("First 4 evaluation images")["img"] == 1
    assert "split <code>val</code>" in text and "LOST" in page.sections


def test_dense_markdown_numbers_settings_and_counts():
    def lost(hits):
        return {"setting": {"layer": 5, "kind": "k", "bias": 0.0, "normalize": False}, "k": 100, "corloc": hits / 32,
                "n": 32, "sweep": [{}, {}], "best_on_eval_set": {"layer": 4, "kind": "v", "bias": 0.5, "normalize": True,
                                                                  "corloc": 1.0}}

    variants = {"baseline": {"artifacts": {"outlier_fraction": 0.1103, "neighbour_cosine": 0.0196,
                                           "attention_entropy": 2.0004}, "lost": lost(3), "description": "baseline"},
                "ttr": {"artifacts": {"outlier_fraction": 0.0, "neighbour_cosine": 0.0193,
                                      "attention_entropy": 1.9996}, "lost": lost(1), "description": "ttr"}}
    dataset = {"name": "VOC", "format": "voc", "split": "val", "images": 34, "images_evaluated": 32,
               "train_split": None, "train_images": None, "train_images_used": None}
    md = DenseResult(model="m", dataset=dataset, tasks=["lost", "artifacts"], settings={"input_size": [64, 64]},
                     variants=variants).to_markdown()
    assert "Dataset: VOC [voc], split `val`: 32 of 34 images (2 skipped); input 64×64." in md
    assert "| outlier patches, last block (%) | 11.03 | 0.00 (−11.03) |" in md
    assert "| neighbour patch cosine | 0.020 | 0.019 (±0.000) |" in md  # −0.0003 rounds to zero: never "−0.000"
    assert "| attention entropy, last block (nats) | 2.000 | 2.000 (−0.001) |" in md  # −0.0008
    assert "| LOST CorLoc (%) | 9.38 | 3.12 (−6.25) |" in md  # 3/32 → 1/32: the delta is not 3.12 − 9.38
    assert "bias 0, normalised: no, k 100 → CorLoc 9.38% on 32 images" in md
    assert "block 4 v, bias 0.5, normalised: yes → 100.00%" in md and "normalize" not in md
