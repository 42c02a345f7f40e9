"""Score answers on the offline hallucination benchmarks without a model: MME's hallucination
subset, HallusionBench, Object HalBench and AMBER, each as its official scorer scores them
(docs/hallucination.md). The data here is a few made-up items in each benchmark's layout; with the
released data, `vsink eval NAME --data ... --model ...` runs an LVLM over it and scores the same way.

    python examples/hallucination_benchmarks.py [WORK_DIR]
"""

import json
import sys
import tempfile
from pathlib import Path

from vsink.evaluate import amber, hallusionbench, mme, object_halbench


def main(work: Path) -> None:
    # MME: two questions per image; lmms-eval's parser ("There is no dog" is neither yes nor no)
    rows = [{"question_id": "existence/1.jpg#0", "image_id": "existence/1.jpg", "category": "existence",
             "label": "yes", "answer": "Yes, there is."},
            {"question_id": "existence/1.jpg#1", "image_id": "existence/1.jpg", "category": "existence",
             "label": "no", "answer": "There is no dog."}]
    print("MME existence score:", mme.score_answers(rows)["categories"]["existence"]["score"])  # 50 + 0

    # HallusionBench: one question on the original figure and on the edited one
    rows = [{"category": "VD", "subcategory": "illusion", "set_id": "0", "figure_id": "0", "question_id": "0",
             "gt_answer": "1", "answer": "Yes."},
            {"category": "VD", "subcategory": "illusion", "set_id": "0", "figure_id": "1", "question_id": "0",
             "gt_answer": "0", "answer": "Yes, they are the same size."}]
    overall = hallusionbench.score_answers(rows)["overall"]
    print("HallusionBench aAcc / fAcc / qAcc:", overall["aAcc"], overall["fAcc"], overall["qAcc"])  # 0.5 0.5 0.0

    # Object HalBench: CHAIR with its synonym table; truth from COCO instances (here a dict)
    coco = {"images": [{"id": 1, "file_name": "1.jpg"}], "categories": [{"id": 18, "name": "dog"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 18}]}
    score = object_halbench.scorer({"annotations": coco})
    out = score([{"image_id": 1, "caption": "Assistant: A puppy sleeps next to two cats."}])
    print("Object HalBench CHAIR_i:", out["chair_i"])  # puppy is a dog, the cats are not there: 0.5

    # AMBER: its data folder (annotations, relation.json, safe words); without spaCy, similarity is off
    data = work / "amber"
    data.mkdir(parents=True, exist_ok=True)
    (data / "annotations.json").write_text(json.dumps([
        {"id": 1, "type": "generative", "truth": ["dog", "grass"], "hallu": ["cat"]},
        {"id": 2, "type": "discriminative-hallucination", "truth": "no"}]))
    (data / "relation.json").write_text(json.dumps({"dog": [], "grass": ["ground"], "cat": []}))
    (data / "safe_words.txt").write_text("orange\n")
    score = amber.scorer({"data": data, "similarity_model": "en_core_web_lg", "similarity_score": 0.8,
                          "yes_no": "exact"})
    out = score([{"id": 1, "response": "A dog and a cat on the ground."}, {"id": 2, "response": "No"}])
    print("AMBER CHAIR / Cover:", out["generative"]["CHAIR"], out["generative"]["Cover"])  # 33.3 100.0
    print("AMBER existence accuracy:", out["discriminative"]["types"]["existence"]["accuracy"])  # 1/1.001 → 99.9
    print("AMBER settings used:", out["settings"]["word_similarity"])


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()))
