"""LVLM ablations on tiling families (vsink/ablate_lvlm.py on tiny LLaVA-NeXT, LLaVA-OneVision, InternVL,
Idefics3 and SmolVLM; PaliGemma 2, one input per image, alongside):
every tile is one tower input, selected on its own; the ablation reaches exactly the selected
tokens of every tile when the LVLM answers, checked against plain PyTorch hooks written here on
the tower's encoder layers (never vsink's hooks); an empty selection changes nothing; the command
runs on a saved model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from lvlm_models import BUILDERS, random_image, tiny_lvlm
from vsink.ablate import Selection, install_ablation
from vsink.ablate_lvlm import ablate_lvlm, answer_batch, image_tower_inputs, tile_picture
from vsink.cli import main
from vsink.errors import VsinkError
from vsink.io import write_jsonl
from vsink.lvlm import generate

#: (name, (width, height)) of the images, all cut into 32 × 32 tiles
IMAGES = (("square.png", (32, 32)), ("wide.png", (64, 32)), ("tall.png", (32, 64)))
PATCHES = 16  # 4 × 4 patches of 8 pixels (after the class token, where the tower has one)
WIDTH = 32  # the tiny towers' hidden size
MAX_NEW = 3


@dataclass
class Family:
    """A tiling family's tiny model: each image's tile count, worked out from its processor's rules,
    the tower's encoder layers, and ``pixel_values``' shape for the square and the wide image."""

    tiles: dict[str, int]
    layers: Callable[[Any], Any]
    batch_pixels: tuple[int, ...]
    #: class tokens before the patches (SigLIP has none)
    prefix: int
    #: whether zeroing the high-norm tokens changes a greedy answer of the random tiny model
    answers_move: bool

    @property
    def tokens(self) -> int:
        return self.prefix + PATCHES

    def names(self, order) -> list[str]:
        """The tower inputs' names for images in ``order``: IMAGE#tileK when any image has several."""
        if max(self.tiles.values()) == 1:
            return list(order)
        return [f"{n}#tile{t}" for n in order for t in range(self.tiles[n])]

    @property
    def rows(self) -> dict[str, list[int]]:
        """Each image's tiles' rows among the tower inputs, the images in the order of IMAGES."""
        out, start = {}, 0
        for name, _ in IMAGES:
            out[name] = list(range(start, start + self.tiles[name]))
            start += self.tiles[name]
        return out



def encoder_layers(tower: Any) -> Any:
    """A tower's encoder layers, wherever the installed transformers keeps them (5.x: ``encoder``
    on the vision model itself; 4.x: under ``vision_model``; InternViT: ``encoder.layer``)."""
    for path in ("encoder.layers", "vision_model.encoder.layers", "encoder.layer"):
        try:
            return tower.get_submodule(path)
        except AttributeError:
            continue
    raise AssertionError(f"no encoder layers in {type(tower).__name__}")

FAMILIES = {
    # pinpoints (32, 32), (32, 64), (64, 32) (height, width): a square image fits 1 × 1 (its base tile
    # and one crop: 2), a 64 × 32 one 1 × 2 and a 32 × 64 one 2 × 1 (base and two crops: 3); the
    # processor pads a batch's [B, T, 3, H, W] to its longest image
    "llava_next": Family({"square.png": 2, "wide.png": 3, "tall.png": 3},
                         lambda lvlm: encoder_layers(lvlm.model.model.vision_tower), (2, 3, 3, 32, 32), 1, True),
    # 1 to 4 tiles over the grid closest to the aspect ratio: a square image is 1 tile (no thumbnail),
    # a 64 × 32 or 32 × 64 one 2 tiles plus the thumbnail; every tile of the batch in one [tiles, 3, H, W]
    "internvl": Family({"square.png": 1, "wide.png": 3, "tall.png": 3},
                       lambda lvlm: encoder_layers(lvlm.model.model.vision_tower), (4, 3, 32, 32), 1, False),
    # the pinpoints add (64, 64): the same tiles as LLaVA-NeXT for these images; a SigLIP tower
    "llava_onevision": Family({"square.png": 2, "wide.png": 3, "tall.png": 3},
                              lambda lvlm: encoder_layers(lvlm.model.model.vision_tower), (2, 3, 3, 32, 32), 0, False),
    # 4 sub-images and the global square for the square image, 2 and the global one for the others
    # (the 32 × 32 squares of the image resized); the batch is padded with all-zero squares to 5
    "idefics3": Family({"square.png": 5, "wide.png": 3, "tall.png": 3},
                       lambda lvlm: encoder_layers(lvlm.model.model.vision_model), (2, 5, 3, 32, 32), 0, True),
    "smolvlm": Family({"square.png": 5, "wide.png": 3, "tall.png": 3},
                      lambda lvlm: encoder_layers(lvlm.model.model.vision_model), (2, 5, 3, 32, 32), 0, True),
    # one [3, H, W] input per image (every image resized to one square), as LLaVA-1.5: no tile names
    "paligemma2": Family({"square.png": 1, "wide.png": 1, "tall.png": 1},
                         lambda lvlm: encoder_layers(lvlm.vision_tower()), (2, 3, 32, 32), 0, True),
    "gemma3": Family({"square.png": 1, "wide.png": 1, "tall.png": 1},
                     lambda lvlm: encoder_layers(lvlm.vision_tower()), (2, 3, 32, 32), 0, True),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiles")
    for i, (name, size) in enumerate(IMAGES):
        random_image(i, size).save(root / name)
    questions = [{"question_id": i, "image": name, "object": obj, "split": "random", "label": label,
                  "text": f"is there a {obj} ?"}
                 for i, (name, obj, label) in enumerate((("square.png", "cat", "yes"), ("wide.png", "dog", "no"),
                                                         ("tall.png", "cat", "no"), ("wide.png", "cat", "yes")))]
    return request.param, tiny_lvlm(request.param), questions, root


def tiled(lvlm, root):
    """The images and each one's tower inputs."""
    images = {name: Image.open(root / name).convert("RGB") for name, _ in IMAGES}
    return images, {name: image_tower_inputs(lvlm, im, "x") for name, im in images.items()}


def plain_zero(layer, masks):
    """A forward hook of my own on encoder layer ``layer`` that zeroes the tokens ``masks`` [rows, N]."""
    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = torch.where(masks[..., None], torch.zeros_like(hidden), hidden)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
    return layer.register_forward_hook(hook)


def block0_outputs(lvlm, layers, inputs, store):
    """Capture block 0's output as block 1 reads it (a forward pre-hook of my own), then run the LVLM."""
    handle = layers[1].register_forward_pre_hook(lambda m, args: store.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            return lvlm.model(**inputs).logits
    finally:
        handle.remove()


def test_each_image_is_its_tiles_as_the_model_encodes_them(setup):
    """The tower inputs of an image are its tiles as the model reads them (Family.tiles, worked out
    from the processor's rules); a batch of the square and the wide image is ``batch_pixels`` in
    ``pixel_values`` (LLaVA-NeXT pads the square image to 3 tiles) and the tower still reads
    exactly their tiles, in order: the rows answer_batch hands the ablation, after checking they
    are the tiles the selection was made on (other pixels are refused); the tower alone on them
    gives the block-0 output the LVLM's own forward has."""
    name, lvlm, questions, root = setup
    family = FAMILIES[name]
    images, tiles = tiled(lvlm, root)
    assert {n: t.shape[0] for n, t in tiles.items()} == family.tiles
    chunk = questions[:2]
    inputs, current = answer_batch(lvlm, chunk, images, tiles, family.rows, "{question}")
    assert tuple(inputs["pixel_values"].shape) == family.batch_pixels
    assert current == family.rows["square.png"] + family.rows["wide.png"]
    seen, block0 = [], []
    handle = family.layers(lvlm)[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            block0_outputs(lvlm, family.layers(lvlm), inputs, block0)
    finally:
        handle.remove()
    assert seen == [len(current)]
    # the tower alone on those tiles (as vsink's tower pass runs it) gives the block-0 output the LVLM has
    with torch.no_grad():
        alone = lvlm.vision_tower()(pixel_values=torch.cat([tiles["square.png"], tiles["wide.png"]]),
                                    output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(block0[0], alone, rtol=0, atol=1e-5)
    with pytest.raises(VsinkError, match=r"question 0: the tower inputs of its image 'square.png' in a batch are not"):
        answer_batch(lvlm, chunk, images, {**tiles, "square.png": tiles["square.png"] + 1}, family.rows, "{question}")


def test_an_ablation_reaches_exactly_its_tokens_in_every_tile_when_the_lvlm_answers(setup):
    """A fixed selection, different in every tile (tile row r: patch r % 16, and token 0 of the wide
    image's tiles: the class token, or SigLIP's first patch), zeroed at block 0 through vsink's install_ablation and
    answer_batch: block 0's output changes at exactly those tokens of every tile of the batch and
    nowhere else, and the logits equal those of my own hook zeroing the same tokens."""
    name, lvlm, questions, root = setup
    family = FAMILIES[name]
    total = sum(family.tiles.values())
    images, tiles = tiled(lvlm, root)
    tokens = np.zeros((total, family.tokens), dtype=bool)
    for r in range(total):
        tokens[r, family.prefix + r % PATCHES] = True
    tokens[family.rows["wide.png"], 0] = True
    selection = Selection("registers", 0, "block_output", tokens)
    values = torch.zeros(total, family.tokens, WIDTH)
    inputs, current = answer_batch(lvlm, questions, images, tiles, family.rows, "{question}")
    # the tower reads the questions' images' tiles in order: square, wide, tall, wide again
    rows = family.rows
    expected = torch.as_tensor(tokens[rows["square.png"] + rows["wide.png"] + rows["tall.png"] + rows["wide.png"]])

    clean, ablated = [], []
    clean_logits = block0_outputs(lvlm, family.layers(lvlm), inputs, clean)
    with install_ablation(lvlm.vision_backbone(), selection, values, current):
        logits = block0_outputs(lvlm, family.layers(lvlm), inputs, ablated)
    changed = (clean[0] != ablated[0]).any(-1)
    assert torch.equal(changed, expected) and (ablated[0][expected] == 0).all()
    assert not torch.equal(logits, clean_logits)

    handle = plain_zero(family.layers(lvlm)[0], expected)
    try:
        with torch.no_grad():
            mine = lvlm.model(**inputs).logits
    finally:
        handle.remove()
    torch.testing.assert_close(logits, mine, rtol=0, atol=1e-6)


def test_an_empty_selection_changes_no_answer_and_no_logit(setup):
    """A threshold no norm reaches selects nothing: zeroing it leaves every answer (ablate_lvlm) and
    the logits (the same selection installed by hand on the batch) exactly as clean."""
    name, lvlm, questions, root = setup
    family = FAMILIES[name]
    total = sum(family.tiles.values())
    result = ablate_lvlm(lvlm, questions, root, targets=["high-norm"], ablations=["zero"], layers=[0],
                         threshold=1e9, batch_size=4, max_new_tokens=MAX_NEW, progress=False)
    selection = result.selections[0]
    assert selection.tokens.shape == (total, family.tokens) and selection.count == 0
    row = result.answers.rows[0]
    assert (row.answers_changed, row.yes_no_flips, row.changed) == (0, 0, [])
    assert result.rows[0].cos_patches == 1.0

    images, tiles = tiled(lvlm, root)
    inputs, current = answer_batch(lvlm, questions, images, tiles, family.rows, "{question}")
    with torch.no_grad():
        clean = lvlm.model(**inputs).logits
        with install_ablation(lvlm.vision_backbone(), selection, torch.zeros(total, family.tokens, WIDTH), current):
            ablated = lvlm.model(**inputs).logits
    assert torch.equal(clean, ablated)


def test_high_norm_tokens_are_selected_per_tile_and_the_answers_follow_a_plain_hook(setup):
    """With an absolute threshold the high-norm target of each tile is its patch tokens whose block-0
    output norm exceeds it, the norms pooled over every tile of every image (computed here from
    the tower's own hidden states on the processor's tiles). Zeroing them, every answer is the
    one greedy decoding gives under my own hook zeroing those tokens of each tile, and so are the
    logits of the questions' batch."""
    name, lvlm, questions, root = setup
    family = FAMILIES[name]
    total = sum(family.tiles.values())
    images = {image: Image.open(root / image).convert("RGB") for image, _ in IMAGES}
    prompt = "{question}\nAnswer the question using a single word or phrase."
    order = list(dict.fromkeys(q["image"] for q in questions))  # the tiles' order: images as first asked
    tiles = torch.cat([image_tower_inputs(lvlm, images[n], prompt.format(question="")) for n in order])
    with torch.no_grad():
        hidden = lvlm.vision_tower()(pixel_values=tiles, output_hidden_states=True).hidden_states[1]
    norms = hidden[:, family.prefix:].float().norm(dim=-1)  # [tiles, 16 patches], block 0's output
    pooled = norms.flatten().sort().values
    i = int(0.8 * pooled.numel())
    assert pooled[i + 1] - pooled[i] > 1e-3  # no knife edge between the flagged and the rest
    threshold = float(pooled[i] + pooled[i + 1]) / 2
    expected = torch.cat([torch.zeros(total, family.prefix, dtype=torch.bool), norms > threshold], dim=1)

    result = ablate_lvlm(lvlm, questions, root, targets=["high-norm"], ablations=["zero"], layers=[0],
                         threshold=threshold, batch_size=4, max_new_tokens=MAX_NEW, progress=False)
    assert result.images == family.names(order)
    assert torch.equal(torch.as_tensor(result.selections[0].tokens), expected)
    assert result.answers.settings["tower_inputs"] == {n: family.tiles[n] for n in order}

    start = {n: sum(family.tiles[m] for m in order[:order.index(n)]) for n in order}
    batch = [images[q["image"]] for q in questions]
    inputs = lvlm.prepare(batch, [prompt.format(question=q["text"]) for q in questions])
    clean = [t.strip() for t in generate(lvlm, inputs, max_new_tokens=MAX_NEW).texts]
    masks = torch.cat([expected[start[q["image"]]:start[q["image"]] + family.tiles[q["image"]]] for q in questions])
    handle = plain_zero(family.layers(lvlm)[0], masks)
    try:
        mine = [t.strip() for t in generate(lvlm, inputs, max_new_tokens=MAX_NEW).texts]
    finally:
        handle.remove()
    changed = [{"question_id": q["question_id"], "image": q["image"], "clean": a, "ablated": b}
               for q, a, b in zip(questions, clean, mine) if a != b]
    assert result.answers.rows[0].changed == changed
    assert bool(changed) == family.answers_move

    # the logits too (the tiny InternVL and LLaVA-OneVision answer alike either way): the selection vsink chose,
    # installed on the batch answer_batch gives, against my hook
    own = {image: image_tower_inputs(lvlm, images[image], prompt.format(question="")) for image in order}
    rows = {image: list(range(start[image], start[image] + family.tiles[image])) for image in order}
    inputs, current = answer_batch(lvlm, questions, images, own, rows, prompt)
    with torch.no_grad():
        with install_ablation(lvlm.vision_backbone(), result.selections[0], torch.zeros(total, family.tokens, WIDTH),
                              current):
            logits = lvlm.model(**inputs).logits
        handle = plain_zero(family.layers(lvlm)[0], masks)
        try:
            mine = lvlm.model(**inputs).logits
        finally:
            handle.remove()
        assert not torch.equal(logits, lvlm.model(**inputs).logits)
    torch.testing.assert_close(logits, mine, rtol=0, atol=1e-6)


def test_cli_on_a_saved_model_writes_results_and_report(setup, tmp_path, capsys):
    """``vsink ablate --model DIR --questions`` on the saved tiny model: one tower input per tile
    (named IMAGE#tileK), the answers table, results.json and the HTML report."""
    name, _, questions, root = setup
    family = FAMILIES[name]
    model, processor = BUILDERS[name]()
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    write_jsonl(tmp_path / "q.jsonl", questions)
    out = tmp_path / "abl"
    assert main(["ablate", str(root), "--model", str(tmp_path / "m"), "--questions", str(tmp_path / "q.jsonl"),
                 "--targets", "high-norm", "--layers", "0", "--threshold", "sigma:1", "--max-new-tokens",
                 str(MAX_NEW), "--out", str(out), "--no-progress"]) == 0
    assert "| clean |" in capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    assert data["images"] == family.names([n for n, _ in IMAGES])
    assert data["selections"][0]["tokens"] > 0
    assert data["answers"]["questions"] == 4 and data["settings"]["lvlm"]["tower_inputs"] == family.tiles
    assert [r["name"] for r in data["answers"]["rows"]] == ["high-norm@0:zero"]
    assert "LVLM answers under ablation" in (out / "report.html").read_text()


@pytest.mark.parametrize("family", ["idefics3", "llava_onevision"])
def test_an_input_the_tower_pass_cannot_reproduce_gives_no_tower_inputs(family):
    """Idefics3: a pixel attention mask that pads inside a real square (the tower would read a patch
    mask vsink's tower pass lacks); LLaVA-OneVision: a row of two images (the model does not tile
    them). Both give no tower inputs, which ablate_lvlm refuses in one line."""
    lvlm = tiny_lvlm(family)
    inputs = dict(lvlm.prepare([random_image(0, (64, 32))], ["x"]))
    assert lvlm.tower_inputs(inputs) is not None
    if family == "idefics3":
        mask = inputs["pixel_attention_mask"].clone()
        mask[0, 0, -1, -1] = 0
        inputs["pixel_attention_mask"] = mask
    else:
        inputs["batch_num_images"] = torch.tensor([2])
    assert lvlm.tower_inputs(inputs) is None


def test_a_tile_picture_is_the_tile_the_processor_made(setup):
    """The report's figure shows a tile's own picture: on a solid (200, 100, 50) image every tile
    (crops, base tile, thumbnail, global image) is that colour again once the processor's
    normalisation is undone (±1 for the resampling and float rounding)."""
    name, lvlm, _, _ = setup
    image = Image.new("RGB", (64, 32), (200, 100, 50))
    fallback = Image.new("RGB", (1, 1))
    for tile in image_tower_inputs(lvlm, image, "x"):
        picture = np.asarray(tile_picture(lvlm, tile, fallback)).astype(int)
        assert picture.shape == (32, 32, 3)
        assert np.abs(picture - np.array([200, 100, 50])).max() <= 1
