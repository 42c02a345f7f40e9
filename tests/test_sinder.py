"""The ``sinder`` recipe (vsink/train/sinder.py, singular_offsets.py, neighbour_loss.py): only the
singular-value offsets train, the anomaly rule and neighbour loss against hand computations, and
a planted defect that a few steps repair (the reference: haoqiwang/sinder @ 3b5cd45, ``repair.py``,
``neighbor_loss.py``, ``main.py``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import vsink
from vsink.cli import main
from vsink.data.planted_defect import (MODEL_KWARGS, SIZE, TIMM_NAME, build_planted_defect_model, planted_defect_images,
                                       planted_vectors)
from vsink.defect import defect_directions
from vsink.errors import VsinkError
from vsink.train import load_config
from vsink.train.loop import TrainTask
from vsink.train.neighbour_loss import anomalous, neighbour_loss, neighbour_targets
from vsink.train.singular_offsets import attach_offsets, bake_offsets
from vsink.train.sinder import BlockOutputs, anomaly_counts

from conftest import timm_model

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "sinder.yaml"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VSINK_CACHE_DIR", str(tmp_path / "cache"))


def _tiny() -> torch.nn.Module:
    return timm_model("deit_tiny_patch16_224", patch_size=8, depth=2, embed_dim=64, num_heads=4)


def test_only_the_offsets_train_and_start_at_the_original():
    """Per block of a width-64 ViT with a 256-wide MLP, the offsets are one per singular value:
    qkv's value rows [64, 64] → 64, proj [64, 64] → 64, fc1 [256, 64] → 64, fc2 [64, 256] → 64,
    so 2 blocks × 4 × 64 = 512 trainable numbers; queries and keys get none (the reference's
    ``replace_linear_addition_noqk``)."""
    model = _tiny()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = model(x)
    named = attach_offsets(vsink.wrap(model))
    assert sum(p.numel() for _, p in named) == 512
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [n for n, _ in named]
    assert all(n.endswith(".delta") for n, _ in named) and len(named) == 8
    # with every offset at 0 the model computes exactly what it did
    assert torch.allclose(model(x), before, atol=1e-6, rtol=0)


def test_offsets_are_singular_value_shifts():
    """With δ set, a layer's weight is U·diag(S + δ)·Vᵀ of its frozen weight (numpy's SVD, float64),
    on qkv's value rows only: the query and key rows stay as they were."""
    model = _tiny()
    qkv = model.blocks[0].attn.qkv
    fc1 = model.blocks[1].mlp.fc1
    w_qkv, w_fc1 = qkv.weight.detach().clone().double().numpy(), fc1.weight.detach().clone().double().numpy()
    attach_offsets(vsink.wrap(model))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in (qkv, fc1):
            delta = layer.parametrizations.weight[0].delta
            delta.copy_(torch.randn(delta.shape, generator=g))
    d_qkv = qkv.parametrizations.weight[0].delta.detach().double().numpy()
    u, s, vt = np.linalg.svd(w_qkv[128:], full_matrices=False)
    got = qkv.weight.detach().double().numpy()
    np.testing.assert_array_equal(got[:128], w_qkv[:128])
    np.testing.assert_allclose(got[128:], u @ np.diag(s + d_qkv) @ vt, atol=1e-5)
    d_fc1 = fc1.parametrizations.weight[0].delta.detach().double().numpy()
    u, s, vt = np.linalg.svd(w_fc1, full_matrices=False)
    np.testing.assert_allclose(fc1.weight.detach().double().numpy(), u @ np.diag(s + d_fc1) @ vt, atol=1e-5)
    # baking leaves plain weights of the same values and a plain state dict
    expected = fc1.weight.detach().clone()
    assert bake_offsets(model) == 8
    assert torch.equal(fc1.weight, expected) and not hasattr(fc1, "parametrizations")
    assert not any("parametrizations" in k for k in model.state_dict())


def test_a_family_without_linear_blocks_is_refused():
    backbone = vsink.wrap(_tiny())
    for block in backbone.blocks:
        for name, child in list(block.named_children()):
            setattr(block, name, torch.nn.Identity())
    with pytest.raises(VsinkError, match="hold no nn.Linear layers"):
        attach_offsets(backbone)


def _grid(centre: list[float], extra: tuple[int, int] | None = None) -> torch.Tensor:
    """A 5×5 grid of 3-vectors, all orthogonal to e0 except the centre (and ``extra``): edge
    neighbours of the centre [0, 2, 0], corner neighbours [0, 0, 4], the border [0, 1, 1]."""
    x = torch.tensor([0.0, 1.0, 1.0]).repeat(5, 5, 1)
    for r, c in ((1, 2), (3, 2), (2, 1), (2, 3)):
        x[r, c] = torch.tensor([0.0, 2.0, 0.0])
    for r, c in ((1, 1), (1, 3), (3, 1), (3, 3)):
        x[r, c] = torch.tensor([0.0, 0.0, 4.0])
    x[2, 2] = torch.tensor(centre)
    if extra is not None:
        x[extra] = torch.tensor([3.0, 0.0, 0.0])
    return x


def test_anomaly_rule_and_neighbour_loss_by_hand():
    e0 = torch.tensor([1.0, 0.0, 0.0])
    # one of 25 patches along e0: |cos| is 1 there, 0 elsewhere; mean 1/25 = 0.04, unbiased std
    # sqrt((0.96² + 24·0.04²) / 24) = sqrt(0.04) = 0.2, so 4σ puts the bar at 0.84 < 1: flagged
    x = _grid([5.0, 0.0, 0.0])
    mask = anomalous(x, e0, 4.0)
    assert mask.sum() == 1 and mask[2, 2]
    # its target: neighbours have p = exp(0) = 1, itself exp(-1/0.1) = e^-10; with the Gaussian
    # (edges 2/16, corners 1/16, centre 4/16): T = (4·2/16·[0,2,0] + 4·1/16·[0,0,4] + 4/16·e^-10·[5,0,0])
    #                                              / (4·2/16 + 4·1/16 + 4/16·e^-10)
    eps = math.exp(-10.0)
    den = 0.5 + 0.25 + 0.25 * eps
    t = torch.tensor([1.25 * eps, 1.0, 1.0]) / den
    assert torch.allclose(neighbour_targets(x, e0, 0.1)[1, 1], t, atol=1e-6)
    # loss: ‖x − T‖ / α, α = mean norm of the 3×3 interior = (5 + 4·2 + 4·4) / 9 = 29/9
    loss, _ = neighbour_loss(x, e0, sigmas=4.0, temperature=0.1)
    expected = float((torch.tensor([5.0, 0.0, 0.0]) - t).norm()) / (29 / 9)
    assert loss is not None and abs(float(loss) - expected) < 1e-6
    # the gradient reaches only the anomalous patch
    x.requires_grad_(True)
    loss, _ = neighbour_loss(x, e0, sigmas=4.0, temperature=0.1)
    loss.backward()
    assert x.grad[2, 2].abs().sum() > 0 and x.grad.abs().sum() == x.grad[2, 2].abs().sum()
    # two of 25 along e0: mean 0.08, std sqrt((2·0.92² + 23·0.08²) / 24) = 0.2769, bar 1.188 > 1: none
    assert not anomalous(_grid([5.0, 0.0, 0.0], extra=(1, 2)), e0, 4.0).any()
    # with 3σ the bar is 0.08 + 0.831 = 0.911 < 1: both
    assert anomalous(_grid([5.0, 0.0, 0.0], extra=(1, 2)), e0, 3.0).sum() == 2
    # a lone patch along e0 on the border is never flagged (it has no 3×3 neighbourhood)
    border = _grid([0.0, 2.0, 0.0], extra=(0, 2))
    assert not anomalous(border, e0, 4.0).any() and neighbour_loss(border, e0)[0] is None


def test_gradient_below_the_limit_is_cut_per_image():
    """BlockOutputs.keep multiplies the gradient reaching a block's output per image: with block 0's
    output kept for image 1 only, a loss on image 0's block-1 output leaves block 0's offsets
    without gradient, and the same loss on image 1 gives them one."""
    backbone = vsink.wrap(_tiny())
    named = dict(attach_offsets(backbone))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    block0 = "blocks.0.mlp.fc2.parametrizations.weight.0.delta"
    block1 = "blocks.1.mlp.fc2.parametrizations.weight.0.delta"
    for image, reaches in ((0, False), (1, True)):
        for p in named.values():
            p.grad = None
        with BlockOutputs(backbone) as seen:
            backbone.train_forward(x)
        seen.keep = {0: torch.tensor([0.0, 1.0])}
        seen.outputs[1][image].pow(2).sum().backward()
        assert (named[block0].grad.abs().sum() > 0) == reaches
        assert named[block1].grad.abs().sum() > 0


# --- a planted defect (vsink/data/planted_defect.py: the construction and why u is the direction) --
def test_planted_defect_is_repaired(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model, (u, _) = build_planted_defect_model(), planted_vectors()
    backbone = vsink.wrap(model)
    found = defect_directions(backbone, samples=600, progress=False)
    # the construction's premise: the weight-only direction is u after every block
    assert all(abs(float(torch.as_tensor(d).float() @ u)) >= 0.99 for d in found.directions)
    weights = tmp_path / "planted.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    folder = tmp_path / "images"
    folder.mkdir()
    for i, im in enumerate(planted_defect_images(12, backbone.mean, backbone.std)):
        im.save(folder / f"{i:02d}.png")
    out = tmp_path / "run"
    kwargs = json.dumps(MODEL_KWARGS)
    args = ["finetune", "--config", str(CONFIG), "--no-progress", f"out={out}", f"model.spec=timm:{TIMM_NAME}",
            f"model.img_size={SIZE}", "model.pretrained=false", f"model.weights={weights}", f"model.model_kwargs={kwargs}",
            "sinder.samples=600", "sinder.window=4", "data.source=folder", f"data.path={folder}", "data.num_images=8",
            "data.eval_images=4", "data.flip=false", "train.steps=12", "train.batch_size=2", "train.lr=0.01",
            "train.checkpoint_every=100"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # before: each held-out image has its 3 lit patches flagged after each of the 3 blocks
    assert records[0]["eval/anomalous_tokens"] == 9 and records[0]["eval/anomaly_free"] == 0
    assert records[1]["loss_block"] == 0 and records[1]["anomalous_tokens"] == 3
    summary = json.loads((out / "summary.json").read_text())
    final = summary["final_eval"]
    assert final["anomalous_tokens"] < 9 and final["norm_ratio_max"] < records[0]["eval/norm_ratio_max"] / 2
    # the stopping rule: a window of 4 images at 75 % ends the run before train.steps
    assert summary["stopped_early"] and summary["steps_done"] < 12 and "stopped early" in printed
    assert summary["trainable_parameters"] == 3 * 4 * 64 and summary["offset_layers"] == 12
    # the direction of the change, from the construction: the b → u unit's gain shrinks, so the
    # offsets of fc1's and fc2's top singular values (b and u) are negative
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    state = load_file(str(ckpt / "model.safetensors"))
    assert state["blocks.0.mlp.fc1.parametrizations.weight.0.delta"][0] < 0
    assert state["blocks.0.mlp.fc2.parametrizations.weight.0.delta"][0] < 0
    # save and load: the saved model is the planted one with the offsets of the last checkpoint
    repaired = vsink.load(str(out / "final"))
    rebuilt = vsink.wrap(build_planted_defect_model())
    attach_offsets(rebuilt)
    rebuilt.model.load_state_dict(state)
    x = repaired.preprocess(planted_defect_images(2, backbone.mean, backbone.std))
    assert torch.allclose(repaired.forward(x), rebuilt.forward(x), atol=1e-5)
    directions = torch.as_tensor(found.directions, dtype=torch.float32)
    assert anomaly_counts(repaired, x, directions, 4.0).sum() < anomaly_counts(backbone, x, directions, 4.0).sum()


def test_shipped_config_and_rules():
    cfg = load_config(CONFIG)
    assert cfg.recipe == "sinder" and cfg.train.optimizer == "sgd" and cfg.sinder.sigmas == 4.0
    with pytest.raises(VsinkError, match=r"'model\.attention' must be softmax, got gated"):
        load_config(CONFIG, ["model.attention=gated"])
    with pytest.raises(VsinkError, match=r"'sinder\.stop_fraction' must be"):
        load_config(CONFIG, ["sinder.stop_fraction=0"])


def test_stopping_window_by_hand():
    """Window of 4 images, 2 images per step, starting full of images with anomalies:
    [F F F F] + (0.5 → T F) = [F F T F]: 1/4; + (1.0 → T T) = [T F T T]: 3/4 ≥ 0.75, stop."""
    from collections import deque

    from vsink.train.sinder import SinderTask

    cfg = load_config(CONFIG, ["train.batch_size=2", "sinder.window=4"])
    task = SinderTask.__new__(SinderTask)  # the stopping rule only: no model needed
    task.cfg, task.window = cfg, deque([False] * 4, maxlen=4)
    assert task.stop_reason({"step": 1, "anomaly_free": 0.5}) is None
    assert list(task.window) == [False, False, True, False]
    reason = task.stop_reason({"step": 2, "anomaly_free": 1.0})
    assert reason == "75% of the last 4 training images were anomaly-free (sinder.stop_fraction 0.75)"
    assert task.stop_reason({"step": 3}) is None  # a record without the metric adds nothing
    assert list(task.window) == [True, False, True, True]


class _StopAfter(TrainTask):
    """A one-weight task that asks to stop once 3 steps have been recorded."""

    def __init__(self):
        self.module, self.num_samples, self.seen = torch.nn.Linear(1, 1), 4, 0

    def trainable(self):
        return list(self.module.named_parameters())

    def loss(self, model, samples, positions):
        return model(torch.ones(len(samples), 1)).pow(2).mean(), {}

    def finish(self, directory):
        return {}

    def stop_reason(self, record):
        self.seen += 1
        return "three steps" if self.seen >= 3 else None


def test_loop_stops_early_and_a_resume_replays_the_stop(tmp_path):
    from vsink.train.config import TrainConfig
    from vsink.train.loop import train

    settings = TrainConfig(steps=10, batch_size=2, checkpoint_every=100, eval_every=100, warmup_steps=0)
    first = train(_StopAfter(), settings, tmp_path, seed=0, device=torch.device("cpu"), progress=False)
    assert first["steps_done"] == 3 and first["stopped_early"] == "three steps"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000003"]
    # resuming: the kept records (steps 1-3) are replayed into the rule, which stops before any step
    again = train(_StopAfter(), settings, tmp_path, seed=0, device=torch.device("cpu"), resume=True, progress=False)
    assert again["resumed_from"] == 3 and again["steps_done"] == 3 and again["stopped_early"] == "three steps"
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3]
