"""Dense evaluation of the demo model, baseline vs test-time registers, on the synthetic dataset.

    python examples/dense_eval.py [OUT_DIR]

Finds the demo's register neurons, then measures linear-probe segmentation, LOST (a small sweep)
and artifact metrics for both variants in one call; writes OUT_DIR/results.{json,md,html}.
The demo model is SYNTHETIC (planted high-norm tokens, random otherwise): its numbers show the
pipeline working, not what registers do to a real model.
"""

import sys
from pathlib import Path

import vsink
from vsink.data.demo_images import demo_images
from vsink.data.synthetic import synthetic_dataset
from vsink.evaluate import LostSettings, Variant, evaluate_dense
from vsink.registers import find_register_neurons

out = Path(sys.argv[1] if len(sys.argv) > 1 else "vsink-dense")
backbone = vsink.load("demo")
spec = find_register_neurons(backbone, demo_images(), top_k=4, progress=False)
spec.save(out / "neurons.json")

result = evaluate_dense(
    backbone,
    synthetic_dataset("val", num_images=16),
    train_set=synthetic_dataset("train", num_images=32),
    variants=[Variant("baseline"), Variant("ttr", "ttr", str(out / "neurons.json"))],
    lost_settings=LostSettings(layers=(-1, -2), kinds=("k", "v")),
    progress=False,
)
result.save(out)
print(result.to_markdown())
