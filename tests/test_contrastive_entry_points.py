"""The branch methods (VCD, M3ID, DAMRO, DoLa) and VAF through `vsink generate`, `vsink eval`
and the lmms-eval plugin: settings by the existing options mechanism, results equal to the
library's, incompatible combinations refused in one line before the model loads."""

import json

import numpy as np
import pytest
from PIL import Image

from vsink.data.demo_lvlm import build_tiny_llava
from vsink.lvlm import LVLM, generate

pytestmark = pytest.mark.filterwarnings("ignore::vsink.lvlm.MitigationWarning")


def _image(seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((40, 40, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model, processor = build_tiny_llava()
    model.save_pretrained(root / "m")
    processor.save_pretrained(root / "m")
    _image().save(root / "a.png")
    return root, LVLM(model, processor)


def test_generate_command_runs_each_method_with_its_settings(saved, capsys):
    from vsink.cli import main

    root, lvlm = saved
    for spec, sets, settings in (("vcd", ["vcd.alpha=0.5"], {"alpha": 0.5}),
                                 ("damro+pai", ["damro.k=3", "pai.alpha=0.5"],
                                  {"damro": {"k": 3}, "pai": {"alpha": 0.5}}),
                                 ("dola", ["dola.candidates=low"], {"candidates": "low"}),
                                 ("m3id", ["m3id.lam=1.0"], {"lam": 1.0}), ("vaf", [], {})):
        argv = ["generate", str(root / "a.png"), "--model", str(root / "m"), "--prompt", "is there a cat ?",
                "--mitigation", spec, "--max-new-tokens", "3"]
        for s in sets:
            argv += ["--set", s]
        assert main(argv) == 0, spec
        out = capsys.readouterr()
        expected = generate(lvlm, lvlm.prepare([_image()], ["is there a cat ?"]), mitigation=spec,
                            settings=settings, max_new_tokens=3).texts[0]
        assert expected.strip() in out.out and f"mitigation {spec}" in out.err, spec
        if spec == "damro+pai":  # what the rule did per step, and which edits ran in its branch
            assert "vsink: damro over 3 steps: tokens_changed=" in out.err
            assert "vsink: damro branch outliers (tokens): edits pai" in out.err
            assert "damro per layer" not in out.err
            assert "vsink: damro branch forwards of their own: 3\n" in out.err  # its k tokens: shapes of their own
        if spec == "vcd":  # the noised image has the prompt's shapes: it rides in the main pass's forward
            assert "vsink: vcd branch forwards of their own: 0; stacked with the main pass: noised" in out.err
    assert main(["generate", str(root / "a.png"), "--model", str(root / "m"), "--prompt", "x",
                 "--mitigation", "vcd+m3id"]) == 2
    err = capsys.readouterr().err
    assert "vcd and m3id each set the next-token rule" in err and "Traceback" not in err


def test_eval_chair_runs_the_comparison_set(saved, tmp_path):
    from test_hallucination import OBJECTS, _coco  # the tiny COCO of the hallucination tests

    from vsink.cli import main

    root, _ = saved
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in OBJECTS:
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / "images" / f"img{i}.jpg")
    _coco(tmp_path)
    names = ["none", "vcd", "m3id", "damro", "dola", "vaf", "vcd+vaf"]
    assert main(["eval", "chair", str(tmp_path / "images"), "--model", str(root / "m"),
                 "--annotations", str(tmp_path / "instances.json"), "--num-images", "2", "--mitigation",
                 ",".join(names), "--set", "damro.alpha=1.5", "--max-new-tokens", "3", "--no-progress",
                 "--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["results"]) == set(names)
    assert results["protocol"]["resolved_settings"]["damro"]["alpha"] == 1.5


def test_lmms_eval_plugin_runs_a_branch_method(saved):
    from lmms_eval_api import load_lmms_eval

    load_lmms_eval()  # lmms-eval, or the stand-in of its API where it is not installed
    from lmms_eval.api.instance import Instance

    from vsink.integrations.lmms_eval import VsinkLVLM

    root, lvlm = saved
    lm = VsinkLVLM.create_from_arg_string(f"pretrained={root / 'm'},mitigation=vcd,set_alpha=0.5,set_noise_step=900")
    image = _image(3)
    lm.task_dict = {"toy": {"test": {0: {"image": image}}}}
    request = Instance("generate_until", ("is there a cat ?", {"max_new_tokens": 3, "until": []},
                                          lambda doc: [doc["image"]], 0, "toy", "test"), 0,
                       {"task": "toy", "doc_id": 0, "repeats": 1})
    [text] = lm.generate_until([request])
    expected = generate(lvlm, lvlm.prepare([image], ["is there a cat ?"]), mitigation="vcd",
                        settings={"alpha": 0.5, "noise_step": 900}, max_new_tokens=3).texts[0]
    assert text == expected
