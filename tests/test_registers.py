"""Register-neuron discovery, test-time registers and massive activations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vsink
from vsink.cli import main
from vsink.data import demo_model as D
from vsink.data.demo_images import demo_images
from vsink.detect import detect_massive
from vsink.registers import NeuronSpec, RegisterNeuron, TestTimeRegisters, find_register_neurons
from conftest import PHOTOS, hf_model, open_clip_visual, skimage_photo, timm_case

PLANTED = {(D.PLANTED_BLOCK, n) for n in D.PLANTED_NEURONS}


@pytest.fixture(scope="module")
def demo_spec():
    backbone = vsink.load("demo")
    return backbone, find_register_neurons(backbone, demo_images(), top_k=4, progress=False)


def test_discovery_ranks_planted_neurons_first(demo_spec):
    backbone, spec = demo_spec
    assert {(n.layer, n.neuron) for n in spec.neurons} == PLANTED
    assert spec.settings["detection_layer"] == spec.settings["highest_layer"] == D.PLANTED_BLOCK
    assert spec.settings["images_with_outliers"] == 2
    scores = [n.score for n in spec.neurons]
    assert scores == sorted(scores, reverse=True)


def test_find_then_fix_on_photos_from_the_command_line(tmp_path, capsys):
    # a new user's first experiment: photos on disk, `registers find`, then `scan` with the fix
    paths = []
    for name in PHOTOS:
        path = tmp_path / "photos" / f"{name}.png"
        path.parent.mkdir(exist_ok=True)
        skimage_photo(name).image.save(path)
        paths.append(str(path))
    assert main(["registers", "find", *paths, "--out", str(tmp_path / "neurons.json"), "--no-progress"]) == 0
    spec = json.loads((tmp_path / "neurons.json").read_text())
    assert spec["settings"]["detection_layer"] == spec["settings"]["highest_layer"] == D.PLANTED_BLOCK
    assert {(n["layer"], n["neuron"]) for n in spec["neurons"][:4]} == PLANTED
    assert main(["scan", *paths, "--test-time-registers", str(tmp_path / "neurons.json"),
                 "--out", str(tmp_path / "fixed"), "--no-progress"]) == 0
    fixed = json.loads((tmp_path / "fixed" / "scan.json").read_text())
    assert fixed["high_norm"]["emergence_layer"] is None and fixed["high_norm"]["tokens_total"] == 0
    assert all(layer["norm"]["outlier_fraction"] == 0 for layer in fixed["layers"])


def test_test_time_registers_remove_demo_artifacts(demo_spec):
    backbone, spec = demo_spec
    images = demo_images()
    x = backbone.preprocess([im.image for im in images])
    plain = backbone.forward(x)
    with TestTimeRegisters(spec).applied(backbone):
        assert backbone.layout().num_appended == 1
        result = vsink.scan(backbone, images, progress=False)
        fixed = backbone.forward(x)
    assert backbone.layout().num_appended == 0 and backbone.edits == []
    assert result.high_norm.emergence_layer is None and result.high_norm.tokens == []
    for layer in result.high_norm.layers[D.PLANTED_BLOCK:]:
        assert layer.registers[0] > 3 * layer.max and layer.registers[0] > 10 * layer.median  # now on the register
    for summary in result.attention:
        if summary["index"] in D.SINK_BLOCKS:
            assert summary["register_received"] > 0.5
    assert result.to_json()["layout"]["registers_appended"] == 1
    assert "test_time_registers" in result.settings["edits"][0]
    cos = F.cosine_similarity(plain[:, 0], fixed[:, 0], dim=-1)
    assert cos.min() > 0.99, cos  # the class token barely changes (measured ~0.9994 and ~0.99995)


def test_batch_invariance(demo_spec):
    backbone, spec = demo_spec
    images = [im.image for im in demo_images()]
    mixed = images + [images[0].transpose(0), images[1].rotate(90)]
    with TestTimeRegisters(spec, registers=2).applied(backbone):
        alone = backbone.forward(backbone.preprocess([images[1]]))
        batch = backbone.forward(backbone.preprocess(mixed))
    assert (alone[0] - batch[1]).abs().max().item() <= 1e-5


def test_shift_moves_the_largest_magnitude_per_sample_and_zeroes_patches():
    backbone = vsink.wrap(timm_case("deit"))
    spec = NeuronSpec("", [RegisterNeuron(0, 3, 1.0), RegisterNeuron(0, 7, 1.0)])
    seen = {}

    def plant(h):
        layout = backbone.current_layout()
        h = h.clone()
        h[0, layout.patch_token(1, 2), 3] = -9.0   # sample 0: a large negative value
        h[1, layout.patch_token(0, 0), 3] = 4.0    # sample 1: a different token
        return h

    handles = [backbone.hook("mlp_hidden", 0, plant)]
    ttr = TestTimeRegisters(spec, registers=2, scale=0.5).apply(backbone)
    handles.append(backbone.hook("mlp_hidden", 0, lambda h: seen.__setitem__("h", h.clone())))
    backbone.forward(torch.randn(2, 3, 32, 32))
    ttr.remove()
    for h in handles:
        h.remove()
    h = seen["h"]
    lay = backbone.layout().with_appended(2)
    assert h.shape[1] == lay.num_tokens
    assert torch.all(lay.patches(h, dim=1)[..., [3, 7]] == 0)
    appended = lay.appended_indices()
    assert torch.allclose(h[0, appended, 3], torch.tensor([-4.5, -4.5]))
    assert torch.allclose(h[1, appended, 3], torch.tensor([2.0, 2.0]))


def test_no_register_activity_means_only_the_extra_token_differs(pixel_values):
    """If the listed neurons are silent, the shift changes nothing: the output equals that of
    the same model with the zero token appended and no neuron edit."""
    model = timm_case("deit")
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[5].zero_()
        model.blocks[0].mlp.fc1.bias[5] = -20.0  # GELU(-20) == 0: the neuron never fires
    backbone = vsink.wrap(model)
    x = pixel_values()
    plain = backbone.forward(x)
    spec = NeuronSpec("", [RegisterNeuron(0, 5, 0.0)])
    with TestTimeRegisters(spec).applied(backbone):
        with_ttr = backbone.forward(x)
    extra = backbone.append_tokens(1)
    appended_only = backbone.forward(x)
    extra.remove()
    assert torch.equal(with_ttr, appended_only)
    layout = backbone.layout()
    change = (layout.patches(with_ttr[:, : layout.num_tokens]) - layout.patches(plain)).norm() / layout.patches(plain).norm()
    assert change < 0.05  # the zero register takes a little attention; nothing else moves


def plant_register_neuron(backbone, layer, neuron, mask_holder, strength=60.0):
    """Plant a register neuron in any family: its output weights write a large fixed vector,
    and a site sets its activation to 1 on the patches in ``mask_holder["mask"]`` [B, P]."""
    proj = backbone._mlp_out_proj(layer)
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(proj.out_features, generator=g)
    with torch.no_grad():
        proj.weight[:, neuron] = direction / direction.norm() * strength

    def fire(h):
        layout = backbone.current_layout()
        h = h.clone()
        patches = layout.patches(h, dim=1)
        patches[..., neuron] = torch.where(mask_holder["mask"].to(h.device), 1.0, 0.0)
        return h

    return backbone.hook("mlp_hidden", layer, fire)


def unit_layer_scale(model):
    """Layer-scale gains set to 1 (DINOv3 starts them at 1e-5, which would scale the planted write away)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name:
                p.fill_(1.0)
    return model


FAMILIES = {
    "timm": lambda: vsink.wrap(timm_case("deit")),
    "timm-eva": lambda: vsink.wrap(unit_layer_scale(timm_case("dinov3"))),  # RoPE, class token + 4 storage tokens
    "open_clip": lambda: vsink.wrap(open_clip_visual()),
    "hf": lambda: vsink.wrap(hf_model("dinov2_reg", "sdpa")),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_planted_neuron_found_and_fixed_in_every_family(family):
    backbone = FAMILIES[family]()
    rng = np.random.default_rng(0)
    images = [vsink.images.NamedImage(f"r{i}", __import__("PIL.Image").Image.fromarray(
        rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))) for i in range(12)]
    n_patches = backbone.layout().num_patches
    mask = torch.zeros(len(images), n_patches, dtype=torch.bool)
    for i in range(len(images)):
        mask[i, rng.choice(n_patches, 2, replace=False)] = True
    holder = {}
    handle = plant_register_neuron(backbone, 0, 11, holder)
    original_forward = backbone.forward
    batches = iter([])

    def forward(x):  # hand the planted mask of exactly these images to the site
        holder["mask"] = next(batches)
        return original_forward(x)

    backbone.forward = forward
    try:
        batches = iter([mask[:8], mask[8:]] * 2)
        spec = find_register_neurons(backbone, images, top_k=1, batch_size=8, progress=False)
        assert [(n.layer, n.neuron) for n in spec.neurons] == [(0, 11)]
        batches = iter([mask[:8], mask[8:]])
        before = vsink.scan(backbone, images, progress=False)
        found = {(t.image, t.token - before.layout.num_prefix) for t in before.high_norm.tokens_at(0)}
        assert found == {(int(i), int(p)) for i, p in torch.nonzero(mask)}
        with TestTimeRegisters(spec).applied(backbone):
            batches = iter([mask[:8], mask[8:]])
            after = vsink.scan(backbone, images, progress=False)
        assert after.high_norm.tokens == []
        assert after.layout.num_appended == 1
    finally:
        backbone.forward = original_forward
        handle.remove()


def test_massive_activations_on_demo_and_by_hand():
    backbone = vsink.load("demo")
    result = vsink.scan(backbone, demo_images(), progress=False)
    u = D.planted_direction()
    top_dim = int(u.abs().argmax())
    dims = {m.dim for m in result.massive}
    assert dims == {top_dim}
    assert {m.layer for m in result.massive} == set(range(D.PLANTED_BLOCK, 6))
    assert all(m.kind == "patch" for m in result.massive)
    trace = vsink.Trace(layout=vsink.TokenLayout(1, 0, (1, 2)), layers=[0],
                        massive_values=np.array([[[-300.0, 2.0]]], np.float32),
                        massive_tokens=np.array([[[2, 0]]]), massive_dims=np.array([[[7, 1]]]),
                        massive_median=np.array([[1.5]], np.float32))
    found = detect_massive(trace, min_ratio=100)
    assert [(m.token, m.kind, m.dim, m.value) for m in found] == [(2, "patch", 7, -300.0)]
    assert found[0].ratio == pytest.approx(200.0)


def test_spec_files_and_errors(tmp_path, demo_spec):
    backbone, spec = demo_spec
    path = spec.save(tmp_path / "neurons.json")
    data = json.loads(path.read_text())
    assert data["model"] == "demo" and set(data) == {"model", "neurons", "settings"}
    assert [(n["layer"], n["neuron"]) for n in data["neurons"]] == [(n.layer, n.neuron) for n in spec.neurons]
    assert NeuronSpec.load(path).neurons == spec.neurons
    (tmp_path / "bad.json").write_text('{"neurons": [{"layer": "x"}]}')
    with pytest.raises(vsink.VsinkError, match=r"bad\.json: neurons\[0\]: field 'layer' must be an integer >= 0, got 'x'"):
        NeuronSpec.load(tmp_path / "bad.json")
    with pytest.raises(vsink.VsinkError, match="outside the 768 MLP units"):
        TestTimeRegisters(NeuronSpec("demo", [RegisterNeuron(2, 5000, 1)])).apply(backbone)
    with pytest.raises(vsink.VsinkError, match="outside the 6 blocks"):
        TestTimeRegisters(NeuronSpec("demo", [RegisterNeuron(9, 0, 1)])).apply(backbone)
    assert backbone.layout().num_appended == 0
    with pytest.raises(vsink.VsinkError, match="no image has outliers at block 1"):
        find_register_neurons(backbone, demo_images(), detection_layer=1, threshold=1e9, progress=False)
    random_model = vsink.wrap(timm_case("deit"))
    with pytest.raises(vsink.VsinkError, match="no high-norm outliers"):
        find_register_neurons(random_model, [im.image for im in demo_images()], progress=False)


def test_cli_registers_find_apply_and_scan_flag(tmp_path, demo_registers):
    """``registers find --top-k 4`` and ``registers apply`` on the demo (run once for the suite:
    conftest.py), then ``scan`` and ``maps`` with the neurons found."""
    spec, cmp, out = demo_registers
    assert {(n["layer"], n["neuron"]) for n in json.loads(spec.read_text())["neurons"]} == PLANTED
    assert " after: no high-norm tokens found, max register share" in out and "None" not in out
    after = json.loads((cmp / "after" / "scan.json").read_text())
    before = json.loads((cmp / "before" / "scan.json").read_text())
    assert before["high_norm"]["emergence_layer"] == D.PLANTED_BLOCK and after["high_norm"]["tokens"] == []
    assert main(["scan", "--test-time-registers", str(spec), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    data = json.loads((tmp_path / "s" / "scan.json").read_text())
    assert data["layout"]["register_position"] == "end" and data["high_norm"]["emergence_layer"] is None
    assert main(["maps", "--test-time-registers", str(spec), "--kind", "norm", "--format", "npz",
                 "--out", str(tmp_path / "m"), "--no-progress"]) == 0
    with np.load(tmp_path / "m" / "china.npz") as d:
        assert d["norm/layer3/prefix"].shape == (2,) and d["norm/layer3/prefix"][1] > 3 * d["norm/layer3"].max()


def test_cut_at_the_score_gap_by_hand():
    from vsink.registers.score_gap import FALLBACK, cut_at_gap

    # one dominant gap (10 -> 1, then spacings of 0.1): the cut is at it, one neuron kept
    one = cut_at_gap([10.0, 1.0, 0.9, 0.8, 0.7, 0.6])
    assert (one.count, one.gap, one.widest, one.clear) == (1, 9.0, 9.0, True)
    # the demo's pattern: two pairs above the bulk, gaps 2.9 (after rank 2) and 1.7 (after rank 4,
    # 0.59 of the widest: wide), then spacings of 0.1 (below a quarter): four kept
    four = cut_at_gap([5.4, 5.4, 2.5, 2.5, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    assert four.count == 4 and four.gap == pytest.approx(1.7) and four.widest == pytest.approx(2.9)
    # evenly spaced scores: the widest gap equals the median gap, no clear gap, the fallback count
    flat = cut_at_gap([float(x) for x in range(64, 0, -1)])
    assert (flat.count, flat.clear) == (FALLBACK, False)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        skimage_photo(name).image.save(folder / f"{name}.png")
    return folder


def test_score_gap_keeps_the_demo_lvlm_tower_planted_neurons_alone(photo_dir, tmp_path, capsys):
    from vsink.data import demo_llava as L

    out = tmp_path / "neurons.json"
    assert main(["registers", "find", str(photo_dir), "--model", "demo-llava", "--out", str(out), "--no-progress"]) == 0
    spec = json.loads(out.read_text())
    # planted by construction: block TOWER_PLANTED_BLOCK, neurons TOWER_NEURONS (vsink.data.demo_llava)
    assert {(n["layer"], n["neuron"]) for n in spec["neurons"]} == {(L.TOWER_PLANTED_BLOCK, n) for n in L.TOWER_NEURONS}
    cut, ranking = spec["settings"]["cut"], spec["settings"]["ranking"]
    assert cut["rule"] == "score gap" and cut["kept"] == 2 and cut["clear_gap"]
    assert len(ranking) == 64 and [r["score"] for r in ranking] == sorted((r["score"] for r in ranking), reverse=True)
    assert cut["gap"] == pytest.approx(ranking[1]["score"] - ranking[2]["score"])
    text = capsys.readouterr().out
    assert "---- cut: 2 kept (at the score gap" in text and "not kept" in text
    # the score plot is written beside neurons.json
    assert (tmp_path / "neurons-scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --top-k still overrides, and the output says what the gap would have kept
    assert main(["registers", "find", str(photo_dir), "--model", "demo-llava", "--out", str(out), "--no-progress",
                 "--top-k", "5"]) == 0
    assert len(json.loads(out.read_text())["neurons"]) == 5
    assert "--top-k 5; the score gap would keep 2" in capsys.readouterr().out


def test_a_threshold_far_from_the_gap_test_warns(photo_dir):
    from vsink.errors import VsinkWarning

    tower = vsink.load("demo-llava")
    # sigma:3 on these photos puts emergence at block 0 (the gap test: block 1, the planted block)
    with pytest.warns(VsinkWarning, match=r"threshold sigma:3 disagrees with the detector's gap test.*emergence at "
                      r"block 0 against .*emergence at block 1"):
        spec = find_register_neurons(tower, sorted(photo_dir.iterdir()), threshold="sigma:3", progress=False)
    assert spec.settings["cut"]["rule"] == "no clear gap"  # and its ranking shows no gap: warned too
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", VsinkWarning)  # the default threshold is the gap test: no warning
        find_register_neurons(tower, sorted(photo_dir.iterdir()), progress=False)


def test_neuron_score_plot_marks_the_cut_between_kept_and_dropped():
    from vsink.export.neuron_figures import neuron_scores_figure

    fig = neuron_scores_figure([6.0, 3.2, 2.3, 2.2, 2.1], 2, "score gap", "t $\\frac{$")
    ax = fig.axes[0]
    cut = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(cut) == 1 and list(cut[0].get_xdata()) == [2.5, 2.5]
    kept = [line for line in ax.get_lines() if line.get_label().startswith("kept")][0]
    assert list(kept.get_xdata()) == [1, 2] and list(kept.get_ydata()) == [6.0, 3.2]
    assert ax.get_ylim()[0] <= 0.0  # the score axis starts at 0
    fig.canvas.draw()  # a title with mathtext characters draws as written


def test_an_lvlm_tower_spec_loads_as_a_vision_backbone(photo_dir, tmp_path, capsys):
    from vsink.data import demo_llava as L

    # SPEC#vision_tower (docs/registers.md) is the spec an LVLM's own tower carries
    tower = vsink.load("demo-llava#vision_tower")
    assert tower.spec == "demo-llava#vision_tower" and tower.synthetic
    assert tower.num_layers == L.TOWER["num_hidden_layers"] and tower.embed_dim == L.TOWER["hidden_size"]
    out = tmp_path / "neurons.json"
    assert main(["registers", "find", str(photo_dir), "--model", "demo-llava#vision_tower", "--out", str(out),
                 "--no-progress"]) == 0
    spec = json.loads(out.read_text())
    assert spec["model"] == "demo-llava#vision_tower"
    assert {(n["layer"], n["neuron"]) for n in spec["neurons"]} == {(L.TOWER_PLANTED_BLOCK, n) for n in L.TOWER_NEURONS}
    capsys.readouterr()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", vsink.errors.VsinkWarning)  # found and applied on the tower: no mismatch warning
        assert main(["scan", str(photo_dir), "--model", "demo-llava#vision_tower", "--test-time-registers", str(out),
                     "--out", str(tmp_path / "fixed"), "--no-progress"]) == 0
    fixed = json.loads((tmp_path / "fixed" / "scan.json").read_text())
    assert fixed["high_norm"]["tokens_total"] == 0
    assert "LVLM_SPEC#vision_tower" in vsink.spec_forms()
