"""Add 4 registers to the demo model post hoc and distil it until its high-norm tokens are gone.

    python examples/posthoc_registers.py [OUT_DIR]

Runs configs/posthoc.yaml (teacher: the demo model with test-time registers) for 150 CPU steps,
then scans the original and the student on 16 held-out synthetic images. The demo model is
SYNTHETIC (planted artifacts); see docs/finetune.md for real models.
"""

import sys
from pathlib import Path

import vsink
from vsink.data.synthetic import synthetic_dataset
from vsink.train import load_config, run_finetune

out = Path(sys.argv[1] if len(sys.argv) > 1 else "vsink-posthoc")
config = Path(__file__).resolve().parent.parent / "configs" / "posthoc.yaml"
cfg = load_config(config, [f"out={out}", "train.steps=150", "train.eval_every=50"])
summary = run_finetune(cfg, progress=False)
print("final agreement with the teacher:", {k: round(v, 4) for k, v in summary["final_eval"].items()})

images = [s.load().image for s in synthetic_dataset("test", num_images=16, size=112).samples]
for name, model in (("original", vsink.load("demo", img_size=112)), ("student", vsink.load(str(out / "final")))):
    result = vsink.scan(model, images, img_size=112, progress=False)
    print(f"{name}: {model.layout().describe()}; {result.high_norm.summary()}")
