"""Register fine-tuning: recipe validation, the loop's schedule and parameter groups, the posthoc
recipe on the demo model, resume after SIGKILL, and DDP on CPU with gloo."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import vsink
from vsink.errors import VsinkError
from vsink.train import ConfigError, Recipe, load_config, run_finetune
from vsink.train.config import RECIPE
from vsink.train.loop import lr_factor, no_decay_parameters, param_groups, sample_order

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = ["model.spec=timm:vit_tiny_patch16_224", "model.img_size=32",
        "model.model_kwargs={patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3}", "registers.n=2",
        "data.num_images=32", "data.eval_images=8", "train.eval_every=1000", "train.log_every=1000",
        "train.warmup_steps=3"]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["posthoc", "scratch", "sinder"])
def test_shipped_recipes_validate(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert isinstance(cfg, Recipe) and cfg.recipe == name


def test_recipe_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: posthoc\ntrain:\n  stepz: 10\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'train\.stepz'; did you mean 'steps'\?"):
        load_config(bad)
    bad.write_text("train: {lr: fast}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: 'train\.lr' must be a finite number > 0, got 'fast'"):
        load_config(bad)
    bad.write_text("teacher: {kind: oracle}\n")
    with pytest.raises(ConfigError, match=r"'teacher\.kind' must be one of original, ttr, denoised"):
        load_config(bad)
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:2: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="use KEY=VALUE"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match=r"'train\.batch_size' must be an integer >= 1, got 0"):
        load_config(None, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match=r"'student\.unlock' must be a list, each one of pos_embed, patch_embed, norm, cls_token, got \['everything'\] \(entry 'everything' is not one of"):
        load_config(None, ["student.unlock=[everything]"])
    cfg = load_config(None, ["train.lr=1e-3", "student.blocks=[1, 2]"])
    assert cfg.train.lr == 1e-3 and cfg.student.blocks == [1, 2]
    with pytest.raises(ConfigError, match=r"x: unknown key 'trian'; did you mean 'train'\?"):
        Recipe.from_mapping({"trian": {}}, "x")
    with pytest.raises(ConfigError, match=r"x: 'model' must be a mapping, got 'demo'"):
        Recipe.from_mapping({"model": "demo"}, "x")
    with pytest.raises(ConfigError, match=r"x: a recipe must be a YAML mapping, got list"):
        Recipe.from_mapping([], "x")


def _field_paths(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _field_paths(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_recipe_fields_are_the_declared_keys():
    """One dataclass field per RECIPE key, in its order (config.yaml keeps the order), each
    defaulting to the declared default; Recipe() is the default recipe."""
    default = Recipe()
    assert list(_field_paths(default)) == list(RECIPE)
    assert default == load_config(None) == Recipe.from_mapping(None)
    for key, option in RECIPE.items():
        assert default.value(key) == option.default, key
    assert default.student.unlock is not Recipe().student.unlock  # no default shared between recipes
    assert default.student.unlock is not RECIPE["student.unlock"].default
    with pytest.raises(KeyError):
        default.value("model")


@pytest.mark.parametrize("name", ["posthoc", "scratch"])
def test_recipe_to_dict_round_trips(name, tmp_path):
    cfg = load_config(CONFIGS / f"{name}.yaml", ["train.lr=2e-3", "student.blocks=[0, -1]", "model.model_kwargs={depth: 2}",
                                                 f"out={tmp_path}", "data.source=folder", f"data.path={tmp_path}"])
    raw = cfg.to_dict()
    assert list(raw) == [f.name for f in dataclasses.fields(Recipe)] and raw["train"]["lr"] == 2e-3
    assert all(type(raw[k]) is dict for k in ("model", "registers", "teacher", "student", "loss", "sinder", "data",
                                               "train"))
    assert Recipe.from_mapping(raw, "again") == cfg
    assert Recipe.from_mapping(yaml.safe_load(yaml.safe_dump(raw, sort_keys=False)), "config.yaml") == cfg  # as written
    raw["train"]["lr"] = 1.0
    assert cfg.train.lr == 2e-3  # a copy
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0


def test_run_finetune_takes_a_mapping_or_a_recipe(tmp_path):
    cfg = load_config(CONFIGS / "scratch.yaml", [*TINY, "train.steps=2", "train.checkpoint_every=2"])
    by_recipe = run_finetune(dataclasses.replace(cfg, out=str(tmp_path / "recipe")), progress=False)
    raw = {**cfg.to_dict(), "out": str(tmp_path / "mapping")}
    by_mapping = run_finetune(raw, progress=False)
    for s in (by_recipe, by_mapping):
        del s["images_per_s"], s["model"]
    assert by_mapping == by_recipe
    assert (tmp_path / "mapping" / "config.yaml").read_text() == (tmp_path / "recipe" / "config.yaml").read_text() \
        .replace(str(tmp_path / "recipe"), str(tmp_path / "mapping"))
    a = load_file(str(tmp_path / "recipe" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "mapping" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # either is validated before anything is written: a partial mapping takes the defaults, and a
    # Recipe changed by hand is checked like a file
    with pytest.raises(ConfigError, match=r"recipe: unknown key 'train\.stepz'; did you mean 'steps'\?"):
        run_finetune({"out": str(tmp_path / "bad"), "train": {"stepz": 1}}, progress=False)
    bad = dataclasses.replace(cfg, recipe="posthoc", registers=dataclasses.replace(cfg.registers, n=0),
                              out=str(tmp_path / "bad"))
    with pytest.raises(ConfigError, match=r"recipe: 'registers\.n' must be at least 1 for the posthoc recipe"):
        run_finetune(bad, progress=False)
    assert not (tmp_path / "bad").exists()


def test_resume_compares_the_earlier_recipe_key_by_key(tmp_path):
    from vsink.train.recipes import _preflight

    ckpt = tmp_path / "checkpoints" / "step_0000001"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"")
    (ckpt / "state.pt").write_bytes(b"")
    earlier = load_config(None, [f"out={tmp_path}", "student.blocks=[1]", "model.model_kwargs={depth: 2}"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(earlier.to_dict(), sort_keys=False))
    _preflight(earlier, tmp_path, resume=True)
    further = dataclasses.replace(earlier, train=dataclasses.replace(earlier.train, steps=500, log_every=1, eval_every=7))
    _preflight(further, tmp_path, resume=True)  # how far it trains and how often it reports may change
    # the learning rate is what it trains with (and the restored scheduler would keep the old one)
    with pytest.raises(VsinkError, match=r"made with train\.lr=0\.001, this recipe has 0\.5; a resumed run keeps"):
        _preflight(dataclasses.replace(earlier, train=dataclasses.replace(earlier.train, lr=0.5)), tmp_path, resume=True)
    # the data: every differing key is named, with both values
    fewer = dataclasses.replace(earlier, data=dataclasses.replace(earlier.data, num_images=8, eval_images=4))
    with pytest.raises(VsinkError, match=r"made with data\.num_images=64, this recipe has 8; "
                                         r"data\.eval_images=16, this recipe has 4;"):
        _preflight(fewer, tmp_path, resume=True)
    with pytest.raises(VsinkError, match=r"pass --resume"):
        _preflight(earlier, tmp_path, resume=False)
    changed = dataclasses.replace(earlier, student=dataclasses.replace(earlier.student, blocks=[0]))
    with pytest.raises(VsinkError, match=r"made with student\.blocks=\[1\], this recipe has \[0\]"):
        _preflight(changed, tmp_path, resume=True)
    changed = dataclasses.replace(earlier, model=dataclasses.replace(earlier.model, model_kwargs={"depth": 3}))
    with pytest.raises(VsinkError, match=r"made with model\.model_kwargs=\{'depth': 2\}, this recipe has \{'depth': 3\}"):
        _preflight(changed, tmp_path, resume=True)
    with pytest.raises(VsinkError, match=r"made with recipe='posthoc', this recipe has 'scratch'"):
        _preflight(dataclasses.replace(earlier, recipe="scratch"), tmp_path, resume=True)


@pytest.mark.parametrize("steps, state", [(8, "is complete"), (3, "went further")])
def test_resume_refuses_a_run_that_would_train_nothing_more(tmp_path, steps, state):
    from vsink.train.recipes import _preflight

    ckpt = tmp_path / "checkpoints" / "step_0000008"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"")
    (ckpt / "state.pt").write_bytes(b"")
    earlier = load_config(None, [f"out={tmp_path}", "train.steps=8"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(earlier.to_dict(), sort_keys=False))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    fewer = dataclasses.replace(earlier, train=dataclasses.replace(earlier.train, steps=steps))
    with pytest.raises(VsinkError, match=rf"the run in .* {state} at step 8 .* train\.steps={steps} trains nothing "
                                         r"more; pass train\.steps > 8"):
        _preflight(fewer, tmp_path, resume=True)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_overrides_name_the_full_key_and_the_last_value_wins():
    with pytest.raises(ConfigError, match=r"override: unknown key 'train\.step'; did you mean 'train\.steps'\?"):
        load_config(CONFIGS / "posthoc.yaml", ["train.step=5"])
    # a base list of overrides, then the one that changes it (as the tests' own recipes do)
    assert load_config(CONFIGS / "posthoc.yaml", ["train.steps=5", "train.steps=6"]).train.steps == 6
    assert load_config(None, ["model.model_kwargs.depth=2"]).model.model_kwargs == {"depth": 2}


def test_a_bad_override_value_is_blamed_on_the_override_not_the_valid_file(tmp_path):
    # configs/sinder.yaml is valid alone; the negative value came from the command line
    with pytest.raises(ConfigError, match=r"^override: 'sinder\.sigmas' must be a finite number > 0, got -1"):
        load_config(CONFIGS / "sinder.yaml", ["sinder.sigmas=-1"])
    # a file that is invalid alone is still named, with or without overrides
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: 'train\.lr' must be a finite number > 0, got -1"):
        load_config(bad, ["train.steps=2"])
    # an override that repairs the file's bad value gives a valid recipe
    assert load_config(bad, ["train.lr=0.1"]).train.lr == 0.1


def test_schedule_order_and_groups():
    assert [round(lr_factor(i, 10, 2, 0.0), 4) for i in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    first = sample_order(5, 0, range(10))
    assert sorted(first[:5]) == list(range(5)) and sorted(first[5:]) == list(range(5)) and first[:5] != first[5:]
    assert sample_order(5, 0, [7, 3]) == [first[7], first[3]]
    backbone = vsink.load("demo").with_registers(2)
    groups = param_groups(list(backbone.model.named_parameters()), 0.05, no_decay_parameters(backbone))
    no_decay = {id(p) for p in groups[1]["params"]}
    named = dict(backbone.model.named_parameters())
    for name in ("reg_token", "pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"):
        assert id(named[name]) in no_decay, name
    assert id(named["blocks.0.attn.qkv.weight"]) not in no_decay and groups[1]["weight_decay"] == 0.0


def test_posthoc_recipe_removes_the_demo_outliers(posthoc_example_run):
    """150 CPU steps of configs/posthoc.yaml (the run of examples/posthoc_registers.py, shared with
    its test: conftest.py): the student with 4 registers, distilled from the demo model with
    test-time registers as teacher, has no high-norm patch at any block, keeps patch features of
    the non-outlier patches (cos >= 0.99) and its class token (cos >= 0.99)."""
    out, _ = posthoc_example_run
    summary = json.loads((out / "summary.json").read_text())  # what run_finetune returned
    recipe = yaml.safe_load((out / "config.yaml").read_text())
    assert recipe["recipe"] == "posthoc" and recipe["train"]["steps"] == 150
    start = _metrics(out)[0]
    assert start["step"] == 0 and start["eval/student_outlier_fraction_max"] > 0.03  # the planted artifacts
    final = summary["final_eval"]
    assert final["student_outlier_fraction_max"] == 0.0
    assert final["patch_cosine_clean"] >= 0.99 and final["cls_cosine"] >= 0.99
    student = vsink.load(str(out / "final"))
    assert student.layout().num_registers == 4
    result = vsink.scan(student, [im.image for im in __import__("vsink.data.demo_images", fromlist=["x"]).demo_images()],
                        img_size=112, progress=False)
    assert result.high_norm.emergence_layer is None


def _finetune_here(args) -> None:
    """``vsink finetune`` in this process, on one thread as the subprocesses run (``_env``): the
    uninterrupted reference runs, which need no process of their own (saves an interpreter start)."""
    from vsink.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["finetune", "--no-progress", *args]) == 0
    finally:
        torch.set_num_threads(threads)


def _run_cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "vsink.cli", "finetune", "--no-progress", *args],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    common = ["--config", str(CONFIGS / "scratch.yaml"), *TINY, "train.steps=40", "train.checkpoint_every=5",
              "train.keep_checkpoints=3", "train.batch_size=8"]
    _finetune_here([*common, f"out={tmp_path / 'full'}"])
    killed = _run_cli([*common, f"out={tmp_path / 'killed'}"])
    ckpt = tmp_path / "killed" / "checkpoints" / "step_0000015"
    deadline = time.time() + 240
    while not ckpt.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL and not (tmp_path / "killed" / "final").exists()
    resumed = _run_cli([*common, f"out={tmp_path / 'killed'}", "--resume"])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()
    assert "resumed from" in err.decode()
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in _metrics(tmp_path / "killed")]
    assert steps == list(range(0, 41))  # no step lost or repeated in the log


def test_ddp_two_gloo_processes_match_one_process_with_double_batch(tmp_path):
    common = ["--config", str(CONFIGS / "scratch.yaml"), *TINY, "train.steps=8", "train.checkpoint_every=8"]
    ddp = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "vsink.cli", "finetune", "--no-progress", *common, "train.batch_size=4",
                            f"out={tmp_path / 'two'}"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:  # the one-process run while the launch starts its interpreters
        _finetune_here([*common, "train.batch_size=8", f"out={tmp_path / 'one'}"])
    finally:
        _, err = ddp.communicate(timeout=300)
    assert ddp.returncode == 0, err.decode()[-3000:]
    one = [r["loss"] for r in _metrics(tmp_path / "one") if "loss" in r]
    two = [r["loss"] for r in _metrics(tmp_path / "two") if "loss" in r]
    assert len(one) == len(two) == 8
    assert one[-1] < one[0]
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2


def test_scratch_model_loads_with_timm(tmp_path):
    import timm

    cfg = load_config(CONFIGS / "scratch.yaml", [*TINY, f"out={tmp_path}", "train.steps=3"])
    run_finetune(cfg, progress=False)
    meta = json.loads((tmp_path / "final" / "vsink.json").read_text())
    kwargs = {**meta["model_kwargs"], "img_size": 32}
    overlay = dict(file=str(tmp_path / "final" / "model.safetensors"), num_classes=kwargs["num_classes"])
    model = timm.create_model(meta["architecture"], pretrained=True, **kwargs, pretrained_cfg_overlay=overlay).eval()
    x = torch.randn(2, 3, 32, 32)
    backbone = vsink.load(str(tmp_path / "final"))
    with torch.no_grad():
        assert torch.allclose(model(x), backbone.model(x), atol=1e-6)
    assert model.num_reg_tokens == 2 and backbone.layout().num_registers == 2


def test_denoised_teacher_without_augmentations_equals_the_original(tmp_path):
    from vsink.train.recipes import PosthocTask, _last_tokens
    from vsink.train.data import load_training_images

    cfg = load_config(None, ["model.img_size=64", "teacher.kind=denoised", "teacher.shifts=0", "teacher.flips=false",
                             "data.num_images=2", "data.eval_images=2"])
    base = vsink.load("demo", img_size=64)
    images = load_training_images(cfg.data, (64, 64), 0, classification=False)
    task = PosthocTask(cfg, base, images, torch.device("cpu"))
    x = task.eval_x
    cls, grid = task.targets(x)
    ref_cls, ref_grid = _last_tokens(vsink.load("demo", img_size=64), x)
    assert torch.allclose(grid, ref_grid, atol=1e-6) and torch.allclose(cls, ref_cls, atol=1e-6)
    task.cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, shifts=1, flips=True))
    shifted_cls, shifted = task.targets(x)
    assert shifted.shape == grid.shape and not torch.allclose(shifted, grid)


def test_cli_finetune_errors_are_one_line(tmp_path, capsys):
    from vsink.cli import main

    assert main(["finetune", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert main(["finetune", "recipe=distill"]) == 2
    assert main(["finetune", f"out={tmp_path}", "model.spec=timm:vit_tiny_patch16_224", "registers.n=0"]) == 2
    err = capsys.readouterr().err
    assert "--config: must be an existing file" in err and "missing.yaml" in err
    assert "'recipe' must be one of posthoc, scratch, sinder, got 'distill'" in err
    assert "'registers.n' must be at least 1 for the posthoc recipe" in err and "Traceback" not in err
    assert err.count("\n") == 3
