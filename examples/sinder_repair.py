"""Repair a planted singular defect with the SINDER recipe (only singular-value offsets train).

    python examples/sinder_repair.py [OUT_DIR]

The model is SYNTHETIC: a 3-block ViT whose block-0 MLP writes a large component along u into
patches that carry b (vsink/data/planted_defect.py), so its weight-only defect direction is u and
3 patches per image are anomalous after every block. Runs configs/sinder.yaml on 8 such images
(about half a minute on 2 CPU cores) and prints the anomalous patches before and after. On the
demo model the weight-only direction misses the (nonlinear) mechanism; see docs/finetune.md.
"""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

import vsink
from vsink.data.planted_defect import MODEL_KWARGS, SIZE, TIMM_NAME, build_planted_defect_model, planted_defect_images
from vsink.train import load_config, run_finetune

out = Path(sys.argv[1] if len(sys.argv) > 1 else "vsink-sinder")
out.mkdir(parents=True, exist_ok=True)
model = build_planted_defect_model()
backbone = vsink.wrap(model)
weights = out / "planted.safetensors"  # the planted weights, loaded by the recipe (model.weights)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
images = out / "images"
images.mkdir(exist_ok=True)
for i, im in enumerate(planted_defect_images(12, backbone.mean, backbone.std)):
    im.save(images / f"{i:02d}.png")

config = Path(__file__).resolve().parent.parent / "configs" / "sinder.yaml"
cfg = load_config(config, [f"out={out / 'run'}", f"model.spec=timm:{TIMM_NAME}", f"model.img_size={SIZE}",
                           "model.pretrained=false", f"model.weights={weights}",
                           f"model.model_kwargs={json.dumps(MODEL_KWARGS)}", "sinder.samples=600", "sinder.window=8",
                           "data.source=folder", f"data.path={images}", "data.num_images=8", "data.eval_images=4",
                           "data.flip=false", "train.steps=20", "train.batch_size=2", "train.lr=0.01"])
summary = run_finetune(cfg, progress=False)
first = json.loads((out / "run" / "metrics.jsonl").read_text().splitlines()[0])
print(f"anomalous patches per held-out image (all blocks): {first['eval/anomalous_tokens']:g} before, "
      f"{summary['final_eval']['anomalous_tokens']:g} after {summary['steps_done']} steps")
print(f"max/median patch norm: {first['eval/norm_ratio_max']:.1f} before, {summary['final_eval']['norm_ratio_max']:.1f} after")
if summary["stopped_early"]:
    print(f"stopped early: {summary['stopped_early']}")
print(f"repaired model: {summary['model']} (vsink.load), report: {out / 'run' / 'report.html'}")
