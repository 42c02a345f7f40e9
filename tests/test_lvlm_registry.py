"""LVLM families as a registry: plugins from outside (entry point ``vsink.lvlms``) asked before vsink's
own, one discovery policy for every registry, the public plugin API, and the mitigation coverage
table of docs/lvlm.md (current, and every cell true on the family's tiny model)."""

from __future__ import annotations

import ast
import functools
import re
import sys
from pathlib import Path

import pytest
import torch

from vsink.backbones import families as F
from vsink.backbones import lvlm_families as LF
from vsink.backbones.hf_decoder import decoder_of
from vsink.backbones.hf_lvlm import LVLM, load_lvlm
from vsink.backbones.plugins import PluginError
from vsink.cli import main
from vsink.data.demo_lvlm import (build_tiny_gemma3, build_tiny_idefics3, build_tiny_internvl, build_tiny_llava,
                                  build_tiny_llava_next, build_tiny_llava_onevision, build_tiny_paligemma, build_tiny_qwen2_vl,
                                  build_tiny_qwen3_vl)
from vsink.errors import VsinkError
from vsink.lvlm import generate
from vsink.lvlm import coverage as C
from vsink.mitigate import mitigation_registry
from vsink.registers.neurons import NeuronSpec, RegisterNeuron

from lvlm_models import marked

PLUGIN = Path(__file__).parent / "plugin"
#: a tiny model per built-in family (the families of vsink/backbones/lvlm_*.py)
TINY = {"llava": build_tiny_llava, "llava-next": build_tiny_llava_next, "qwen2-vl": build_tiny_qwen2_vl,
        "qwen2.5-vl": functools.partial(build_tiny_qwen2_vl, version="2.5"), "llava-onevision": build_tiny_llava_onevision,
        "paligemma": build_tiny_paligemma, "gemma3": build_tiny_gemma3, "internvl": build_tiny_internvl,
        "qwen3-vl": build_tiny_qwen3_vl, "idefics3": build_tiny_idefics3,
        "smolvlm": functools.partial(build_tiny_idefics3, smolvlm=True)}


def _image(seed: int = 0, size: tuple[int, int] = (32, 32)):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy())


def _distribution(tmp_path: Path, group: str, name: str, module: str) -> None:
    dist = tmp_path / f"vsink_{name}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vsink-{name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{group}]\n{name} = {module}\n")


@pytest.fixture
def lvlm_plugin(tmp_path, monkeypatch):
    """tests/plugin on sys.path as an installed distribution whose ``vsink.lvlms`` entry point names
    ``mini_lvlm``; discovered again into copies of the registry."""
    LF.lvlm_families()
    _distribution(tmp_path, "vsink.lvlms", "mini", "mini_lvlm")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(PLUGIN))
    monkeypatch.setattr(LF, "_loaded", False)
    for table in ("_FAMILIES", "_PLUGINS", "_SINK_DIMS"):
        monkeypatch.setattr(LF, table, type(getattr(LF, table))(getattr(LF, table)))
    assert "mini_lvlm" not in sys.modules
    yield
    sys.modules.pop("mini_lvlm", None)


def test_plugin_files_import_nothing_of_vsink_but_its_public_plugin_module():
    files = sorted(PLUGIN.glob("*.py"))
    assert {f.name for f in files} >= {"mini_vit.py", "mini_lvlm.py", "temperature_mitigation.py"}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith("vsink") or name == "vsink.plugin", f"{path.name} imports {name}"


def test_an_lvlm_family_from_an_entry_point_takes_over_its_models(lvlm_plugin, tmp_path, capsys):
    families = LF.lvlm_families()
    assert list(families)[0] == "mini-llava" and "llava" in families  # plugins first
    from mini_lvlm import MiniLlava

    model, processor = build_tiny_llava()
    lvlm = LVLM(model, processor, "tiny")
    assert type(lvlm) is MiniLlava and lvlm.family == "mini-llava"
    assert type(load_lvlm("demo-llava")).__name__ == "LlavaLVLM"  # 16-pixel patches: not the plugin's

    # loaded from a directory by model type, plugin first
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    assert type(load_lvlm(str(tmp_path / "m"))) is MiniLlava

    # what the family overrides is what vsink uses
    inputs = lvlm.prepare([_image(0), _image(1)], ["describe the image", "is there a cat ?"])
    decoder = decoder_of(lvlm)
    one = lvlm.prepare([_image(0)], ["describe the image"])
    assert decoder.prompt_layout(one).grid == (1, 16)
    model.config._name_or_path = "somewhere/mini-llava"
    assert lvlm.known_sink_dims() == [3, 5]

    # generation: none is HF greedy generate token for token (left-padded batch of 2)
    ours = generate(lvlm, inputs, max_new_tokens=4)
    theirs = model.generate(**inputs, max_new_tokens=4, do_sample=False, num_beams=1)
    assert torch.equal(ours.sequences, theirs)
    with pytest.raises(VsinkError, match=r"^fastv does not apply to tiny \(mini-llava family\): the mini family "
                                         r"keeps every image token \(a test refusal\)$"):
        generate(lvlm, inputs, mitigation="fastv")
    assert C.coverage()["mini-llava"]["fastv"] == MiniLlava.refuses["fastv"]
    assert C.coverage()["mini-llava"]["var"] is None

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "mini-llava" in out and "LlavaForConditionalGeneration, plugin" in out


@pytest.mark.parametrize("registry, group", [(F, "vsink.backbones"), (LF, "vsink.lvlms")])
def test_a_broken_plugin_is_one_error_naming_it(registry, group, tmp_path, monkeypatch):
    _distribution(tmp_path, group, "broken", "no_such_module_here")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_loaded", False)
    message = (rf"^the {group} entry point 'broken' \(no_such_module_here\) failed to load: "
               r"ModuleNotFoundError: No module named 'no_such_module_here'$")
    listing = registry.families if registry is F else registry.lvlm_families
    with pytest.raises(PluginError, match=message):
        listing()
    assert main(["models"]) == 2  # the command line: that one line, exit code 2


def test_the_coverage_table_in_docs_is_current():
    text = C.DOC.read_text(encoding="utf-8")
    assert C.updated(text) == text, "run: python -m vsink.lvlm.coverage"
    assert "| qwen2-vl | `qwen2_vl` | runs |" in text
    # DAMRO's outlier rules (vsink/mitigate/damro_outliers.py) cover every built-in family
    runs = {family for family, row in C.coverage().items() if row["damro"] is None}
    assert runs == set(TINY)


def _settings(name: str, tmp_path: Path) -> dict:
    """Settings a mitigation needs on a tiny model: VAR two sink dimensions (a tiny model has no
    known ones), TTR a neuron of the tower's first block."""
    if name == "var":
        return {"sink_dims": [0, 1]}
    if name == "ttr":
        path = NeuronSpec("", [RegisterNeuron(layer=0, neuron=0, score=1.0)]).save(tmp_path / "neurons.json")
        return {"neurons": str(path)}
    return {}


@pytest.mark.filterwarnings("ignore::vsink.lvlm.MitigationWarning")  # random weights: VAR may find no row
@pytest.mark.parametrize("family", sorted(TINY))
def test_every_coverage_cell_holds_on_the_familys_tiny_model(family, tmp_path):
    builtin = {name for name, cls in LF.lvlm_families().items() if cls.__module__.startswith("vsink.")}
    assert builtin == set(TINY)  # a new family brings its tiny model here
    why = LF.lvlm_families()[family].unavailable()
    if why is not None:
        pytest.skip(why)  # absent from (or not followed in) this transformers: reported, not failed
    model, processor = TINY[family]()
    lvlm = LVLM(model, processor, f"tiny-{family}")
    assert lvlm.family == family
    # same-size images: FastV needs as many image tokens in every row (a property of the batch)
    # (Qwen-VL's images marked as its chat template marks them: transformers 4.x's beam search, which
    # OPERA runs in, counts a row's images by the marks)
    inputs = lvlm.prepare([_image(0), _image(1)], marked(lvlm, ["describe the image", "is there a cat ?"]))
    for name, reason in C.coverage()[family].items():
        settings = _settings(name, tmp_path)
        missing = mitigation_registry()[name].unavailable()  # a mitigation the installed libraries lack
        if reason is None and missing is not None:
            with pytest.raises(VsinkError, match=f"^{re.escape(missing)}$"):
                generate(lvlm, inputs, mitigation=name, settings=settings, max_new_tokens=2)
        elif reason is None:
            result = generate(lvlm, inputs, mitigation=name, settings=settings, max_new_tokens=2)
            assert result.new_tokens.shape == (2, 2)
        else:
            with pytest.raises(VsinkError, match=f"^{name} does not apply to tiny-{family} "):
                generate(lvlm, inputs, mitigation=name, settings=settings, max_new_tokens=2)
    assert set(C.coverage()[family]) == set(mitigation_registry())


def test_the_readme_lists_every_builtin_lvlm_family_with_what_was_verified():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    for name, cls in LF.lvlm_families().items():
        if cls.__module__.startswith("vsink."):
            row = next((line for line in readme.splitlines() if line.startswith(f"| `{name}` |")), None)
            assert row is not None, name
            assert cls.title in row and cls.model_class in row and "real weights" in row


def test_a_family_this_transformers_does_not_serve_is_one_line(monkeypatch):
    import transformers

    from vsink.backbones.hf_lvlm import UnavailableFamily

    cls = LF.lvlm_families()["paligemma"]
    monkeypatch.setattr(transformers, "__version__", "4.57.6")
    assert cls.unavailable().startswith("the paligemma family needs transformers >= 5.0 (installed: 4.57.6): ")
    model, processor = build_tiny_llava()
    model.config.model_type = "paligemma"
    with pytest.raises(UnavailableFamily, match=r"^tiny: the paligemma family needs transformers >= 5\.0"):
        LVLM(model, processor, "tiny")
    monkeypatch.setattr(cls, "model_class", "NoSuchVLForConditionalGeneration")  # a class this release lacks
    assert cls.unavailable() == "transformers 4.57.6 has no NoSuchVLForConditionalGeneration (the paligemma family)"
