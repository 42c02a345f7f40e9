"""One comparison: the scratch recipe with registers and with each sink-free attention variant,
trained on equal terms (same recipe, data, seed and steps) and measured on the same axes
(``vsink finetune --compare-attention``; docs/finetune.md, *Comparing registers and variants*).

Runs: ``registers`` (the recipe as given, ``registers.n`` from it, softmax attention) and one per
variant (``registers.n=0``, ``model.attention=VARIANT``), each in ``OUT/<run>/``. Measured on the
held-out images of each run's final model: accuracy, the high-norm detector's largest outlier
fraction and max/median patch-norm ratio over blocks (the recipe's own evaluation), and from a
probe with attention at the last block: the mean largest share one token receives (*sink share*),
the class token's and registers' received shares and the mean attention entropy, and a linear
probe's segmentation mIoU on synthetic segmentation images at the run's input size
(:func:`probe_miou`). Weights of variants whose rows do not sum to 1 are used as computed.
Written: ``OUT/compare.json``, ``OUT/compare.md``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..attention_variants import VARIANTS, attention_report
from ..errors import VsinkError
from ..io import write_text
from .config import Recipe

#: the measures of each run, in the order of the table
COLUMNS = ("accuracy", "outlier_fraction_max", "norm_ratio_max", "sink_share", "cls_received",
           "register_received", "entropy", "probe_miou")


def comparison_runs(cfg: Recipe, variants: Sequence[str] = VARIANTS[1:]) -> list[tuple[str, Recipe]]:
    """(name, recipe) of every run: ``registers`` and one per variant, each writing ``OUT/<name>``."""
    if cfg.recipe != "scratch":
        raise VsinkError("--compare-attention runs the scratch recipe (recipe: scratch), got recipe "
                         f"{cfg.recipe!r}")
    if cfg.model.attention != "softmax":
        raise VsinkError("--compare-attention sets model.attention itself; leave it at softmax")
    out = Path(cfg.out)
    runs = [("registers", dataclasses.replace(cfg, out=str(out / "registers")))]
    for v in variants:
        model = dataclasses.replace(cfg.model, attention=v)
        regs = dataclasses.replace(cfg.registers, n=0)
        runs.append((v, dataclasses.replace(cfg, out=str(out / v), model=model, registers=regs)))
    return runs


@torch.no_grad()
def attention_measures(model_dir: Path, cfg: Recipe) -> dict[str, Any]:
    """The last block's attention on the run's held-out images: sink share, class-token and
    register shares, entropy (means over images, heads and queries), and the attention report."""
    from ..backbones.registry import load
    from ..detect.attention import layer_attention_summary
    from ..probe import Probe
    from .data import load_training_images, to_input

    backbone = load(str(model_dir))
    images = load_training_images(cfg.data, backbone.img_size, cfg.seed, classification=True)
    x = to_input(images.eval_pixels, backbone.mean, backbone.std, backbone.device, backbone.dtype, None)
    last = backbone.num_layers - 1
    received: list[torch.Tensor] = []
    handle = backbone.hook("attn_probs", last, lambda p, start, s: received.append(p.mean(dim=(1, 2)).cpu()))
    try:
        with Probe(backbone, layers=[last]) as probe:
            backbone.forward(x)
    finally:
        handle.remove()
    summary = layer_attention_summary(probe.trace())[0]
    shares = torch.cat(received).numpy()  # [images, keys]: mean weight each token receives
    return {"sink_share": float(np.mean(shares.max(axis=1))), "cls_received": summary["cls_received"],
            "register_received": summary["register_received"], "entropy": summary["entropy"],
            "attention": attention_report(backbone.model)}


def probe_miou(model_dir: Path, cfg: Recipe, *, progress: bool = False) -> dict[str, Any]:
    """Linear-probe segmentation of the run's final model (:func:`vsink.evaluate.dense.evaluate_dense`,
    task linear-seg, last block): trained on ``data.num_images`` synthetic segmentation images and
    evaluated on ``data.eval_images`` others (split ``val``), all at the model's input size and
    seeded by the recipe's seed; ``{"probe_miou", "probe_miou_interval"}`` (the bootstrap interval
    over the evaluation images)."""
    from ..backbones.registry import load
    from ..evaluate.dense import evaluate_dense
    from ..evaluate.open import open_dataset

    backbone = load(str(model_dir))
    size = backbone.img_size[0]
    sets = {split: open_dataset("synthetic", None, split, synthetic_images=n, synthetic_size=size, seed=cfg.seed)
            for split, n in (("val", cfg.data.eval_images), ("train", cfg.data.num_images))}
    result = evaluate_dense(backbone, sets["val"], train_set=sets["train"], tasks=["linear-seg"], progress=progress)
    name = result.baseline
    interval = result.statistics()["intervals"][name].get("linear_seg.miou")
    return {"probe_miou": result.variants[name]["linear_seg"]["miou"], "probe_miou_interval": interval}


def compare_attention(cfg: Recipe, *, progress: bool = True) -> dict[str, Any]:
    """Run every comparison run (:func:`comparison_runs`) and write ``compare.json`` / ``compare.md``."""
    from .recipes import run_finetune

    runs = comparison_runs(cfg)
    rows = []
    for name, run in runs:
        summary = run_finetune(run, progress=progress)
        ev = summary.get("final_eval", {})
        row = {"run": name, "attention": run.model.attention, "registers": run.registers.n, "out": run.out,
               "accuracy": ev.get("accuracy"), "outlier_fraction_max": ev.get("outlier_fraction_max"),
               "norm_ratio_max": ev.get("norm_ratio_max")}
        row.update(attention_measures(Path(run.out) / "final", run))
        row.update(probe_miou(Path(run.out) / "final", run))
        rows.append(row)
    result = {"recipe": cfg.to_dict(), "columns": list(COLUMNS), "runs": rows}
    out = Path(cfg.out)
    write_text(out / "compare.json", json.dumps(result, indent=2, allow_nan=False) + "\n")
    write_text(out / "compare.md", comparison_table(rows))
    return result


def comparison_table(rows: Sequence[dict[str, Any]]) -> str:
    """The runs as one markdown table (rows that do not sum to 1 marked)."""
    head = "| run | registers | " + " | ".join(COLUMNS) + " | rows sum to 1 |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 3)]
    for r in rows:
        cells = [f"{r[c]:.4g}" if isinstance(r[c], float) else ("-" if r[c] is None else str(r[c])) for c in COLUMNS]
        lines.append(f"| {r['run']} | {r['registers']} | " + " | ".join(cells) +
                     f" | {'yes' if r['attention']['rows_sum_to_one'] else 'no'} |")
    return "\n".join(lines) + "\n"
