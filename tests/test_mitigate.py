"""Mitigations as composable objects on the shared sites (demo LVLM and tiny LLaVA)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vsink.backbones.hf_lvlm import load_lvlm
from vsink.data import demo_llava as DL
from vsink.data.demo_lvlm import build_tiny_llava
from vsink.errors import VsinkError
from vsink.lvlm import LVLM, MitigationWarning, generate
from vsink.mitigate import REGISTRY, make_mitigations
from vsink.registers import find_register_neurons
from conftest import PHOTOS, skimage_photo

PROMPT = "describe the image"


@pytest.fixture(scope="module")
def demo():
    return load_lvlm("demo-llava")


@pytest.fixture(scope="module")
def inputs(demo):
    return demo.prepare([skimage_photo(name).image for name in PHOTOS[:2]], [PROMPT] * 2)


@pytest.fixture(scope="module")
def tower_neurons(demo, tmp_path_factory):
    spec = find_register_neurons(demo.vision_backbone(), [skimage_photo(n) for n in PHOTOS], top_k=2, progress=False)
    assert {(n.layer, n.neuron) for n in spec.neurons} == {(DL.TOWER_PLANTED_BLOCK, n) for n in DL.TOWER_NEURONS}
    return spec.save(tmp_path_factory.mktemp("ttr") / "neurons.json")


def _ttr_by_hand(lvlm):
    """Test-time registers written with plain torch hooks (independent of vsink): one zero token
    appended to the tower's sequence entering block 0; at the planted block, each register
    neuron's signed value of largest magnitude over the sample's tokens moves to that token and
    the neuron is zeroed on the patches (the class token keeps its value); the tower's outputs drop
    the appended token again."""
    tower = lvlm.model.model.vision_tower
    owner = getattr(tower, "vision_model", tower)
    neurons = list(DL.TOWER_NEURONS)

    def append(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        h = torch.cat([h, h.new_zeros(h.shape[0], 1, h.shape[2])], dim=1)
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    def move(module, args):
        a = args[0].clone()
        values = a[:, :, neurons]  # [B, N + 1, k]
        hi, lo = values.amax(dim=1), values.amin(dim=1)
        signed = torch.where(hi.abs() >= lo.abs(), hi, lo)  # equal magnitudes: the first (max) wins ties here
        a[:, 1:-1, neurons] = 0.0
        a[:, -1, neurons] = signed
        return (a, *args[1:])

    def strip(module, args, output):
        n = output.last_hidden_state.shape[1]
        output.last_hidden_state = output.last_hidden_state[:, :-1]
        output.hidden_states = tuple(h[:, :-1] if h is not None and h.shape[1] == n else h
                                     for h in output.hidden_states)
        return output

    return [owner.encoder.layers[0].register_forward_pre_hook(append, with_kwargs=True),
            owner.encoder.layers[DL.TOWER_PLANTED_BLOCK].mlp.fc2.register_forward_pre_hook(move),
            tower.register_forward_hook(strip)]


def test_ttr_plus_var_equals_each_edit_applied_by_hand(demo, inputs, tower_neurons):
    composed = generate(demo, inputs, mitigation="ttr+var", settings={"ttr.neurons": str(tower_neurons)},
                        max_new_tokens=3, capture_attention=True)
    handles = _ttr_by_hand(demo)
    try:
        by_hand = generate(demo, inputs, mitigation="var", max_new_tokens=3, capture_attention=True)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(composed.new_tokens, by_hand.new_tokens)
    torch.testing.assert_close(composed.attention, by_hand.attention, atol=1e-5, rtol=0, equal_nan=True)
    plain_var = generate(demo, inputs, mitigation="var", max_new_tokens=3, capture_attention=True)
    assert not torch.allclose(plain_var.attention, composed.attention, equal_nan=True)  # TTR changed the LLM's input
    assert composed.mitigation == "ttr+var" and set(composed.settings) == {"ttr", "var"}
    ttr_report = composed.report[0]
    assert ttr_report["mitigation"] == "ttr" and ttr_report["layers"] == [
        {"layer": DL.TOWER_PLANTED_BLOCK, "neurons_moved": len(DL.TOWER_NEURONS)}]


def test_reports_say_what_each_mitigation_did(demo, inputs):
    fastv = generate(demo, inputs, mitigation="fastv", settings={"k": 2, "ratio": 0.25}, max_new_tokens=2)
    n_image = demo.image_spans(inputs["input_ids"]).counts()[0]
    pruned = round(0.25 * n_image)  # paper protocol: n − round(nR) kept
    assert fastv.report[0]["layers"] == [{"layer": 2, "tokens_pruned": 2 * pruned}]  # two rows, pruned once
    pai = generate(demo, inputs, mitigation="pai", settings={"start_layer": 1, "end_layer": 3}, max_new_tokens=2)
    heads = demo.text_config.num_attention_heads
    # the last query row of each of 2 rows and 8 heads, in layers 1 and 2, at each of 2 forward passes
    assert pai.report[0]["layers"] == [{"layer": 1, "rows_amplified": 2 * 2 * heads},
                                       {"layer": 2, "rows_amplified": 2 * 2 * heads}]
    var = generate(demo, inputs, mitigation="var", max_new_tokens=2)
    rows = {row["layer"]: row for row in var.report[0]["layers"]}
    assert set(rows) <= set(range(2, demo.num_layers)) and all(r["rows_edited"] > 0 for r in rows.values())
    assert var.report[0]["edited"] and var.warnings == []


def test_a_mitigation_that_edits_nothing_warns(demo, inputs):
    with pytest.warns(MitigationWarning, match="var edited nothing"):
        result = generate(demo, inputs, mitigation="var", settings={"tau": 1000.0}, max_new_tokens=1)
    assert result.report[0]["edited"] is False and result.warnings[0].startswith("var edited nothing")


def test_composition_names_and_settings():
    assert sorted(REGISTRY) == ["damro", "dola", "fastv", "m3id", "opera", "pai", "ttr", "vaf", "var", "vcd"]
    mits = make_mitigations("pai+fastv", {"pai.alpha": 0.5, "fastv": {"k": 3}}, "paper")
    assert [m.name for m in mits] == ["pai", "fastv"] and mits[0].settings.alpha == 0.5 and mits[1].settings.k == 3
    with pytest.raises(VsinkError, match=r"with several mitigations \(pai\+fastv\) say whose it is, e\.g\. pai\.alpha"):
        make_mitigations("pai+fastv", {"alpha": 0.5})
    for settings in ({"ttr.neurons": "n.json"}, {"ttr": {"neurons": "n.json"}}):
        for chosen in ("pai", "pai+fastv"):  # one mitigation or several: ttr's setting is not theirs
            with pytest.raises(VsinkError, match=rf"ttr is not among the chosen mitigations \({re.escape(chosen)}\); "
                                                 rf"add it \(e\.g\. {re.escape(chosen)}\+ttr\)"):
                make_mitigations(chosen, settings)
    with pytest.raises(VsinkError, match="names one mitigation twice"):
        make_mitigations("var+var")
    with pytest.raises(VsinkError, match="unknown mitigation 'nonesuch'"):
        make_mitigations("var+nonesuch")
    model, processor = build_tiny_llava()
    lvlm = LVLM(model, processor)
    rng = np.random.default_rng(0)
    from PIL import Image

    inputs = lvlm.prepare([Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))], ["is there a cat ?"])
    with pytest.raises(VsinkError, match="ttr: set neurons=PATH"):
        generate(lvlm, inputs, mitigation="ttr")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Every attention call of the decoder, as (layer, query rows, which path): ``own`` is the
    model's own implementation as the router captured it, ``explicit`` vsink's explicit attention."""
    from vsink.backbones import hf_router
    from vsink.backbones.sites import SiteModel

    calls: list[tuple[int, int, str]] = []
    own_names: set[str] = set()
    real_function, real_attention = hf_router.implementation_function, SiteModel._attention

    def spied_function(module, implementation):
        fn = real_function(module, implementation)
        own_names.add(fn.__name__)

        def own(module, query, *args, **kwargs):
            calls.append((module.layer_idx, query.shape[2], "own"))
            return fn(module, query, *args, **kwargs)

        return own

    def spied_attention(self, layer, q, *args, **kwargs):
        calls.append((layer, q.shape[2], "explicit"))
        return real_attention(self, layer, q, *args, **kwargs)

    monkeypatch.setattr(hf_router, "implementation_function", spied_function)
    monkeypatch.setattr(SiteModel, "_attention", spied_attention)
    return calls, own_names


def test_rows_and_layers_a_mitigation_leaves_alone_run_the_models_own_attention(demo, inputs, kernel_calls):
    calls, own_names = kernel_calls
    prompt = inputs["input_ids"].shape[1]
    result = generate(demo, inputs, mitigation="pai", settings={"start_layer": 1, "end_layer": 3}, max_new_tokens=3)
    assert result.report[0]["edited"]
    assert own_names == {"sdpa_attention_forward"}  # the demo LVLM runs SDPA: that is what "own" calls
    steps = [prompt, 1, 1]  # the prompt pass, then two cached decode steps
    for layer in (0, 3):  # outside PAI's layers: never routed, every row on the model's kernel
        assert [(q, path) for l, q, path in calls if l == layer] == [(q, "own") for q in steps]
    for layer in (1, 2):  # PAI edits the last row: the prompt's other rows stay on the model's kernel
        assert [(q, path) for l, q, path in calls if l == layer] == [
            (1, "explicit"), (prompt - 1, "own"), (1, "explicit"), (1, "explicit")]
    calls.clear()
    fastv = generate(demo, inputs, mitigation="fastv", settings={"k": 2, "ratio": 0.25}, max_new_tokens=2)
    assert fastv.report[0]["layers"]
    kept = prompt - round(0.25 * demo.image_spans(inputs["input_ids"]).counts()[0])
    # FastV reads the last row's scores in layer k - 1 and then runs every layer on the model's kernel
    assert [(l, q, path) for l, q, path in calls if path == "explicit"] == [(1, 1, "explicit")]
    assert [(q, path) for l, q, path in calls if l == 3] == [(kept, "own"), (1, "own")]


PLUGIN = Path(__file__).parent / "plugin"


@pytest.fixture
def temperature_plugin(tmp_path, monkeypatch):
    """tests/plugin on sys.path as an installed distribution whose ``vsink.mitigations`` entry point
    names ``temperature_mitigation``; discovered again into a copy of the registry."""
    from vsink import mitigate
    from vsink.mitigate import base

    dist = tmp_path / "vsink_temperature-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vsink-temperature\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vsink.mitigations]\ntemperature = temperature_mitigation\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(PLUGIN))
    registry = dict(base.REGISTRY)
    monkeypatch.setattr(base, "REGISTRY", registry)
    monkeypatch.setattr(mitigate, "REGISTRY", registry)
    monkeypatch.setattr(mitigate, "_loaded", False)
    assert "temperature_mitigation" not in sys.modules
    mitigate.mitigation_registry()
    yield registry
    sys.modules.pop("temperature_mitigation", None)


def test_a_mitigation_from_an_entry_point_runs_alone_and_composed(temperature_plugin, demo, inputs):
    assert "temperature" in temperature_plugin
    none = generate(demo, inputs, max_new_tokens=3, capture_attention=True)
    neutral = generate(demo, inputs, mitigation="temperature", settings={"t": 1.0, "layer": 2}, max_new_tokens=3,
                       capture_attention=True)
    assert torch.equal(neutral.new_tokens, none.new_tokens)
    torch.testing.assert_close(neutral.attention, none.attention, atol=1e-5, rtol=0, equal_nan=True)
    hot = generate(demo, inputs, mitigation="temperature+pai", settings={"temperature.t": 8.0, "temperature.layer": 2},
                   max_new_tokens=3, capture_attention=True)
    assert [r["mitigation"] for r in hot.report] == ["temperature", "pai"]
    heads = demo.text_config.num_attention_heads
    assert hot.report[0]["layers"] == [{"layer": 2, "rows_tempered": 3 * 2 * heads}]  # 3 passes, 2 rows
    # without the cache, every recomputed row tempered and amplified as the cache had it; two tokens only:
    # the third pass would feed back row 1's second token, the image token id 4, and a pass over the
    # whole sequence then counts one image token more than the image has (the model refuses it)
    mixed = {"temperature.t": 8.0, "temperature.layer": 1}
    cached = generate(demo, inputs, mitigation="temperature+pai", settings=mixed, max_new_tokens=2,
                      capture_attention=True)
    uncached = generate(demo, inputs, mitigation="temperature+pai", settings=mixed, max_new_tokens=2,
                        capture_attention=True, use_cache=False)
    assert torch.equal(uncached.new_tokens, cached.new_tokens)
    torch.testing.assert_close(uncached.attention, cached.attention, atol=1e-5, rtol=0, equal_nan=True)
    assert [r["layers"] for r in uncached.report] == [r["layers"] for r in cached.report]  # each row counted once
    assert uncached.report[0]["layers"] == [{"layer": 1, "rows_tempered": 2 * 2 * heads}]
    with pytest.raises(VsinkError, match="temperature setting 't'"):
        make_mitigations("temperature", {"t": 0.0})


def test_a_broken_mitigation_plugin_is_one_error_naming_it(tmp_path, monkeypatch):
    from vsink import mitigate
    from vsink.backbones.plugins import PluginError

    dist = tmp_path / "vsink_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vsink-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vsink.mitigations]\nbroken = no_such_module_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(mitigate, "_loaded", False)
    with pytest.raises(PluginError, match=r"^the vsink.mitigations entry point 'broken' \(no_such_module_here\) "
                                          r"failed to load: ModuleNotFoundError: No module named 'no_such_module_here'$"):
        make_mitigations("var")
    with pytest.raises(PluginError, match="'broken'"):  # every later use says it again, nothing runs without it
        mitigate.mitigation_names("var")
