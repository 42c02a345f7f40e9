"""VAR, PAI, FastV and OPERA on a tiny LLaVA built offline (SYNTHETIC: random weights).

    python examples/lvlm_mitigations.py [OUT_DIR]

Calibrates the decoder's sink dimensions, generates for two left-padded prompts with every
mitigation, and exports VAR's per-token attention on the image (npz + png). The outputs of a
random model are word salad; the point is the workflow. For LLaVA-1.5-7B on a GPU see
examples/llava15_gpu.py.
"""

import sys
from pathlib import Path

from vsink.data.demo_images import demo_images
from vsink.data.demo_lvlm import build_tiny_llava
from vsink.lvlm import LVLM, generate
from vsink.lvlm.export import export_attention
from vsink.lvlm.sinks import calibrate

out = Path(sys.argv[1] if len(sys.argv) > 1 else "vsink-lvlm")
model, processor = build_tiny_llava()
lvlm = LVLM(model, processor, "tiny-llava (synthetic)")
images = [im.image for im in demo_images()]
inputs = lvlm.prepare(images, ["is there a tree ?", "describe this image please ."])

dims = calibrate(lvlm, [inputs], num_dims=2).sink_dims
print("sink dimensions (calibrated):", dims)
settings = {"none": {}, "var": {"sink_dims": dims, "tau": 2.0}, "pai": {"alpha": 0.5, "gamma": 1.1},
            "fastv": {"k": 2, "ratio": 0.5}, "opera": {"beams": 3, "candidates": 3}}
for mitigation, values in settings.items():
    result = generate(lvlm, inputs, mitigation=mitigation, settings=values, max_new_tokens=6,
                      capture_attention=mitigation == "var")
    print(f"{mitigation:>5}: {result.texts}")
    if mitigation == "var":
        files = export_attention(lvlm, result, inputs, out / "var-attention", images=images)
        print(f"       exported {len(files)} files to {out / 'var-attention'}")
