"""Model families plug in from outside vsink: one file, a decorator, an entry point."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import vsink
from vsink.backbones import families as F
from vsink.cli import main
from vsink.data.demo_images import demo_images

PLUGIN = Path(__file__).parent / "plugin"


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """tests/plugin on sys.path as an installed distribution whose ``vsink.backbones`` entry point
    names ``mini_vit`` (nothing imports it but vsink's family discovery)."""
    dist = tmp_path / "vsink_mini_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vsink-mini-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vsink.backbones]\nmini = mini_vit\n")
    F.families()  # vsink's own families registered first, in the real registry
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(PLUGIN))
    monkeypatch.setattr(F, "_loaded", False)  # discover the entry points again, into a copy of the registry
    monkeypatch.setattr(F, "_FAMILIES", dict(F._FAMILIES))
    monkeypatch.setattr(F, "_PLUGINS", set(F._PLUGINS))
    assert "mini_vit" not in sys.modules
    yield
    sys.modules.pop("mini_vit", None)


def test_a_family_from_an_entry_point_is_found_by_load_wrap_and_models(plugin, tmp_path, capsys):
    assert "mini" in F.families() and "mini:DEPTH" in F.spec_forms()
    from mini_vit import MiniBackbone, MiniViT

    backbone = vsink.load("mini:2")
    assert isinstance(backbone, MiniBackbone) and backbone.num_layers == 2
    assert isinstance(vsink.wrap(MiniViT()), MiniBackbone)
    assert main(["models"]) == 0 and "mini:DEPTH" in capsys.readouterr().out

    # attention captured through the family's adapter equals softmax(q k^T / sqrt(d)) of its own q, k
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    seen, got = {}, []
    qkv = backbone.model.blocks[1].attn.qkv
    hook = qkv.register_forward_hook(lambda m, a, o: seen.__setitem__("qkv", o))
    plain = backbone.forward(x)
    handle = backbone.hook("attn_probs", 1, lambda p, start, z: got.append(p.clone()))
    routed = backbone.forward(x)
    handle.remove()
    hook.remove()
    q, k, _ = seen["qkv"].reshape(2, 17, 3, 4, 8).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(torch.cat(got, dim=2), torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(routed, plain, atol=1e-5, rtol=0)

    # scan, save and reload like any built-in family
    result = vsink.scan(backbone, demo_images(), progress=False)
    assert result.layout.num_cls == 1 and result.layout.grid == (4, 4)
    backbone.save(tmp_path / "saved")
    reloaded = vsink.load(str(tmp_path / "saved"))
    assert isinstance(reloaded, MiniBackbone)
    torch.testing.assert_close(reloaded.forward(x), plain, atol=0, rtol=0)
    assert main(["scan", "--model", "mini:2", "--out", str(tmp_path / "scan"), "--no-progress"]) == 0


def test_a_family_name_is_registered_once(plugin):
    from vsink.backbones.timm import TimmBackbone

    class Impostor(TimmBackbone):
        family = "timm"

    with pytest.raises(vsink.VsinkError, match="two backbone families are named 'timm'"):
        F.family(Impostor)
    assert F.families()["timm"] is TimmBackbone


def test_a_plugin_family_is_asked_before_a_builtin_one_that_also_accepts_the_model(plugin, monkeypatch):
    import timm

    from mini_vit import MiniBackbone

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, num_classes=0)
    assert type(vsink.wrap(vit)).__name__ == "TimmBackbone"  # the plugin does not accept it
    F.families()
    monkeypatch.setattr(MiniBackbone, "can_wrap", classmethod(lambda cls, model: True))  # now it accepts any model
    assert list(F.families())[0] == "mini"
    assert F.family_of_model(vit) is MiniBackbone


def test_site_tensors_are_checked_against_the_declared_heads(plugin, monkeypatch):
    from mini_vit import MiniBackbone

    backbone = vsink.load("mini:2")  # 4 heads
    x = torch.randn(1, 3, 32, 32)
    monkeypatch.setattr(MiniBackbone, "num_heads", property(lambda self: 8))  # declares 8, hands over 4
    handle = backbone.hook("attn_probs", 1, lambda p, start, z: None)
    with pytest.raises(vsink.VsinkError, match=r"^mini:2: block 1 handed vsink's attention queries of shape "
                                               r"\(1, 4, 17, 8\); the model declares 8 heads"):
        backbone.forward(x)
    handle.remove()
