"""Reproduce VAR and PAI on LLaVA-1.5-7B (needs a GPU and network access to the Hugging Face hub).

    python examples/llava15_gpu.py --out llava15-mitigations
    python examples/llava15_gpu.py --model llava-hf/llava-1.5-13b-hf --out llava15-13b

Loads the model in float16, generates a description and a POPE-style yes/no answer for each image
(default: the two bundled scikit-learn sample images) with none, VAR (the published sink
dimensions ship with vsink: 7B {1415, 2533}, 13B {2100, 4743}), PAI (α = 0.2, layers 2–31,
guidance γ = 1.1) and FastV (k = 3, R = 50%), prints the answers and tokens/s, and writes
each mitigation's per-token attention on the image to OUT/<mitigation>/.

Without the hub (and the model not in the local cache) or without a GPU it stops with a one-line
message (exit code 2); --device cpu --dtype float32 runs it on a CPU, slowly.
"""

import argparse
import sys
import time

import torch

from vsink.backbones.registry import resolve_dtype
from vsink.data.demo_images import demo_images
from vsink.errors import VsinkError
from vsink.images import load_image
from vsink.lvlm import generate, load_lvlm
from vsink.lvlm.export import export_attention

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", default="llava-hf/llava-1.5-7b-hf")
p.add_argument("--device", default="cuda")
p.add_argument("--dtype", default="float16")
p.add_argument("--image", action="append", help="images (default: the bundled sample images)")
p.add_argument("--sink-dims", help="comma list, for models without known sink dimensions")
p.add_argument("--max-new-tokens", type=int, default=64)
p.add_argument("--out", default="llava15-mitigations")
args = p.parse_args()

try:
    lvlm = load_lvlm(args.model, device=args.device, dtype=resolve_dtype(args.dtype))
except VsinkError as e:
    print(f"llava15_gpu.py: error: {e} (this script needs network access to the Hugging Face hub, or the model in "
          "the local cache, and a GPU)", file=sys.stderr)
    sys.exit(2)
images = [load_image(x) for x in args.image] if args.image else [im.image for im in demo_images()]
prompts = ["Describe this image in detail.", "Is there a person in the image? Answer yes or no."]
var = {"sink_dims": [int(d) for d in args.sink_dims.split(",")]} if args.sink_dims else {}
settings = {"none": {}, "var": var, "pai": {"alpha": 0.2, "gamma": 1.1}, "fastv": {"k": 3, "ratio": 0.5}}
for prompt in prompts:
    inputs = lvlm.prepare(images, [prompt] * len(images))
    for mitigation, values in settings.items():
        t0 = time.perf_counter()
        result = generate(lvlm, inputs, mitigation=mitigation, settings=values, max_new_tokens=args.max_new_tokens,
                          capture_attention=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        rate = result.new_tokens.numel() / (time.perf_counter() - t0)
        print(f"--- {mitigation} ({rate:.1f} tokens/s) — {prompt}")
        for text in result.texts:
            print("   ", text.strip())
        export_attention(lvlm, result, inputs, f"{args.out}/{mitigation}/{prompts.index(prompt)}", images=images)
print(f"attention exports in {args.out}/")
