"""Scan the built-in synthetic demo model and print where its high-norm tokens and sinks are.

    python examples/scan_demo.py [OUT_DIR]
"""

import sys

import vsink
from vsink.data.demo_images import demo_images

out_dir = sys.argv[1] if len(sys.argv) > 1 else "vsink-out"
backbone = vsink.load("demo")
print(backbone.describe())

result = vsink.scan(backbone, demo_images(), progress=False)
hn = result.high_norm
print(f"emergence layer: {hn.emergence_layer}")
for layer in hn.layers:
    print(f"block {layer.index}: max/median patch norm {layer.ratio:.1f}, outliers {100 * layer.outlier_fraction:.1f}%")

for image, name in enumerate(result.images):
    tokens = [t for t in hn.tokens_at(hn.emergence_layer) if t.image == image] if hn.emergence_layer is not None else []
    print(f"{name}: {len(tokens)} high-norm patches, e.g. (row, col) {[(t.row, t.col) for t in tokens[:5]]}")

strongest = result.sinks[0] if result.sinks else None  # sinks are listed strongest first
if strongest is not None:
    print(f"strongest sink: block {strongest.layer}, {strongest.kind} token {strongest.token} "
          f"of {result.images[strongest.image]}, {strongest.ratio:.0f}x the median share")
print({k: str(v) for k, v in result.save(out_dir).items()})
