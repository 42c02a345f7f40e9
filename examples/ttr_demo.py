"""Find the demo model's register neurons and remove its high-norm tokens at test time.

    python examples/ttr_demo.py [OUT_DIR]
"""

import sys
from pathlib import Path

import torch.nn.functional as F

import vsink
from vsink.data.demo_images import demo_images
from vsink.registers import TestTimeRegisters, find_register_neurons

out = Path(sys.argv[1] if len(sys.argv) > 1 else "vsink-ttr")
backbone = vsink.load("demo")
images = demo_images()

spec = find_register_neurons(backbone, images, top_k=4, progress=False)
spec.save(out / "neurons.json")
print("register neurons:", [(n.layer, n.neuron) for n in spec.neurons])

x = backbone.preprocess([im.image for im in images])
plain = backbone.forward(x)
before = vsink.scan(backbone, images, progress=False)
with TestTimeRegisters(spec).applied(backbone):
    after = vsink.scan(backbone, images, progress=False)
    fixed = backbone.forward(x)
before.save(out / "before")
after.save(out / "after")

for label, result in (("before", before), ("after", after)):
    print(f"{label}: {result.high_norm.summary()}; layout {result.layout.describe()}")
print("register share of attention per block:", [round(a["register_received"], 3) for a in after.attention])
print("class-token cosine similarity:", F.cosine_similarity(plain[:, 0], fixed[:, 0], dim=-1).tolist())
