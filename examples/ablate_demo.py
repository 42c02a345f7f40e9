"""Causal ablations on the demo model: zero its planted register neurons, then replace the
high-norm tokens by the mean over images and by another image's values, and write the report.

    python examples/ablate_demo.py [OUT_DIR]
"""

import sys
from pathlib import Path

import vsink
from vsink.ablate import ablate
from vsink.data import demo_model
from vsink.data.demo_images import demo_images
from vsink.export.ablation_report import save_ablation

out = Path(sys.argv[1] if len(sys.argv) > 1 else "vsink-ablate")
backbone = vsink.load("demo")
neurons = {demo_model.PLANTED_BLOCK: list(demo_model.PLANTED_NEURONS)}  # or a NeuronSpec from neurons.json

result = ablate(backbone, demo_images(), targets=["neurons", "high-norm"], ablations=["zero", "mean-images", "resample"],
                neurons=neurons, layers=[demo_model.PLANTED_BLOCK], seed=0, progress=False)
for selection in result.selections:
    print(selection.describe())
for row in result.rows:
    print(f"{row.target:<10} block {row.layer} {row.ablation:<12} cos(patches) {row.cos_patches:.3f}  "
          f"cls-attention TV {row.attn_tv:.3f}  high-norm tokens {row.high_norm_before} -> {row.high_norm_after}")
for path in save_ablation(result, out).values():
    print("wrote", path)
