"""Export attention and norm maps for the demo model and for a register model.

    python examples/export_maps.py [OUT_DIR]

* the synthetic demo: its planted high-norm tokens light up the `norm` maps from block 2 on,
  and the `received` maps of blocks 3-5 (attention sinks);
* a DINOv2-style timm ViT with 4 registers (random weights, built locally): the npz keeps the
  class token and the registers apart (`<kind>/layer<L>/prefix`), so the attention they take is
  reported rather than mixed into the patch grid.
"""

import sys
from pathlib import Path

import numpy as np
import timm

import vsink
from vsink.data.demo_images import demo_images

out = Path(sys.argv[1] if len(sys.argv) > 1 else "vsink-maps")
images = demo_images()

demo = vsink.load("demo")
result = vsink.export_maps(demo, images, out / "demo", layers=[1, 2, 4], progress=False)
print(f"demo: {sum(len(m.files) for m in result.images)} files in {out / 'demo'}")

model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=112, depth=4, num_classes=0)
registers = vsink.wrap(model.eval(), "timm:vit_small_patch14_reg4_dinov2 (random weights)")
result = vsink.export_maps(registers, images, out / "registers", kinds=["cls", "rollout"], progress=False)
with np.load(out / "registers" / "china.npz") as arrays:
    prefix = arrays["cls/layer3/prefix"]  # [heads, 1 cls + 4 registers]
    print(f"register model, block 3: class-token attention on [cls, reg0..reg3] (head mean): "
          f"{[round(float(v), 3) for v in prefix.mean(0)]}, on patches: {arrays['cls/layer3/mean'].sum():.3f}")
