"""The planted-hallucination demo LVLM (``--model demo-halluc``): a small LLaVA whose object
hallucination, and its cure by mitigations that move attention to the image or contrast the text
prior away, are mechanisms with a known answer. SYNTHETIC: every weight not listed here is zero;
nothing is learnt.

Images (:mod:`vsink.data.demo_halluc_data`): a 4×4 grid of 16-px cells; each cell carries one
texture, a 16×16 Walsh pattern (mutually orthogonal, zero-mean), for an object class, the
background, or a flat "sink" cell. The CLIP tower (all blocks' residual writes zero) reads the
pattern with matched filters, so after its LayerNorm each image token is a one-hot of its cell's
type; the projector turns that into the language model's image token: ``IMG`` (+ ``OBJ`` and the
class's evidence dimension for an object), or, for a sink cell, the sink dimensions ``SINK_DIMS``.
Two more plants in the tower: its free channels read high-frequency Walsh patterns no cell
carries (:data:`NOISE_GAIN`), silent on a clean image and so loud on a noised one (VCD's branch)
that LayerNorm silences every cell; and the feature layer's class-token attention ranks the sink
cells first, then the background, then objects (DAMRO's "outlier" patches).

Language model (Llama, hidden 1024, 6 layers of which 0 and 2 are planted, rotary base 1e9 so
positions do not matter): the BOS embedding carries the sink dimensions (the text sink); every
other token embedding is four unit features (its token, ``CONST`` and two more), so all have the
same RMS.

* layer 0, head 0 (*object mover*): attends to the object words of the text (logit ``MOVER_LOGIT``)
  and writes which ones were said (``R_c``); head 1 writes whether "and" was said (``D``).
* layer 2, head 0 (*image reader*): logits ``B_IMAGE`` on the non-sink image tokens,
  ``SIGMA_TEXT_SINK`` on BOS, ``SIGMA_VISUAL_SINK`` on sink cells, 0 on text; it writes ``G``, the
  attention mass on the non-sink image tokens, and ``EV_c``, the mass on class c's cells.
* layer 2, head 1 (*matcher*): logit ``MATCH_LOGIT`` on the cells of the object the text asked
  about, ``-MATCH_LOGIT`` on other objects' cells; writes ``M``, the mass on the asked object's cells.
* ``lm_head`` reads those features linearly, planting the text prior: after a question ("." or
  "?", an object word said, no "and") "yes" and "no" share a large offset and differ by
  ``W_G·G* − W_G·G + W_M·M`` before the final RMSNorm: "no" iff ``W_G·G − W_M·M > W_G·G_STAR`` —
  an absent object is denied only when the image reader gives the image more than ``G_STAR`` of
  its attention. After a prompt with no object word ("Please describe this image in detail.")
  the caption is "a X and a Y": each object word scores ``PRIOR[c] + TIE_BREAK·(8 − c) + W_E·EV_c``
  over a shared offset, ``COOCCUR_PRIOR`` more for the word that co-occurs with the object already
  said (:data:`COOCCUR`), ``-SAID_PENALTY·R_c`` for one already said. These differences are kept
  small (a hallucinated answer leads the right one by less than log 10 after the final norm), so
  a contrastive rule's plausibility cutoff leaves the right one in play.

So the baseline's answers are a function of each image's counts (sink cells, cells per class),
computable by hand (see docs/hallucination.md, "The planted-hallucination demo"). VAR (which
moves attention from the sinks to the image), PAI (which scales the image logits of the last row
up) and VAF (image logits × 1.15, BOS's × 0.95 in layer 2, its default window on 6 layers) raise
``G`` and ``EV_c``; VCD (noised image), M3ID (no image) and DAMRO (only the outlier patches)
contrast against a branch with the same prior and no object evidence. :func:`build_demo_halluc`
is deterministic.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from ..backbones.lvlm_families import known_sink_dims, named_lvlm

CLASSES = ("person", "dog", "cat", "car", "bicycle", "bird", "horse", "boat")
#: the object word that co-occurs with each (the caption prior's second mention)
COOCCUR = {"person": "car", "car": "person", "dog": "cat", "cat": "dog", "bicycle": "horse", "horse": "bicycle",
           "bird": "boat", "boat": "bird"}
#: cell types: the classes, then the background and the sink cell
BACKGROUND, SINK = len(CLASSES), len(CLASSES) + 1
GRID, CELL = 4, 16
IMAGE_SIZE = GRID * CELL
TOWER_HIDDEN = 16
FEATURE_LAYER = -2  # the tower layer the language model reads (and DAMRO's attention site)
TOWER_ON = 1.8  # projector units fire above this (a type's own LayerNorm value is √15 ≈ 3.87, others' −0.26)
#: the tower's free channels (10-15) read high-frequency Walsh patterns no cell carries, with this
#: gain: 0 on a clean image, large on a noised one, where LayerNorm then silences every cell
NOISE_GAIN = 1000.0
NOISE_PATTERNS = tuple((a, a) for a in range(8, 8 + 16 - 10))
#: the class token's query and its key weights on the sink and background channels in the tower's
#: feature layer: its attention ranks sink cells first, then background, then objects (DAMRO's outliers)
CLS_QUERY, CLS_SINK_KEY, CLS_BACKGROUND_KEY = 4.0, 2.0, 1.0
HIDDEN, LAYERS, HEADS = 1024, 6, 8  # 6 layers: VAF's default window (9-14 of 32) scaled is layer 2
HEAD_DIM = HIDDEN // HEADS
ROPE_THETA = 1e9
SINK_DIMS = (37, 611)
#: the spec and the model name (``config.name_or_path``) of the demo
SPEC = "demo-halluc"
NAME = "vsink/demo-halluc"
NOTE = "a small LLaVA whose object hallucination and its cure are planted (see docs/hallucination.md)"

known_sink_dims(NAME, SINK_DIMS)
TEXT_SINK = (100.0, 50.0)  # BOS on SINK_DIMS
VISUAL_SINK = (100.0, 0.0)  # a sink cell on SINK_DIMS
# residual dimensions of the planted features
CONST, FILL_A, FILL_B, WORD_FLAG = 80, 81, 82, 83
IMG, OBJ, BG_A, BG_B = 90, 91, 92, 93
TOKEN0, QUERY0, EVIDENCE0 = 100, 300, 320  # token one-hots; an object word's class; a cell's class
SAID0, AND_SAID, G_DIM, EV0, M_DIM = 400, 420, 430, 440, 460
# attention logits
MOVER_LOGIT = 12.0
B_IMAGE, SIGMA_TEXT_SINK, SIGMA_VISUAL_SINK = 4.0, 7.0, 5.0
MATCH_LOGIT = 7.0
# the text prior (lm_head weights, in units of the residual features)
G_STAR = 0.37
W_G, W_M = 1.0, 2.0  # small: a hallucinated "yes" leads "no" by under log 10 (a contrast can still flip it)
W_E = 5.0
PRIOR = {"person": 0.15}
TIE_BREAK = 0.0005  # class c's prior has TIE_BREAK · (8 − c) more, so equal evidence names the earlier class
COOCCUR_PRIOR = 0.17
SAID_PENALTY = 30.0
SEED = 0
SLOT0 = HEAD_DIM // 2 - 9  # query/key features on the slowest rotary pairs (first halves)


def words() -> tuple[str, ...]:
    """The tokenizer's words: the demo LVLMs' plus this demo's object classes."""
    from .demo_lvlm import WORDS

    return tuple(WORDS) + tuple(c for c in CLASSES if c not in WORDS)


def walsh_pattern(kind: int) -> torch.Tensor:
    """The ±1 16×16 texture of cell type ``kind`` (a product of two Walsh functions; zero-mean,
    orthogonal to every other type's)."""
    pairs = [(a, b) for a in range(1, 4) for b in range(0, 4)][: SINK + 1]
    return _walsh(*pairs[kind])


def _walsh(a: int, b: int) -> torch.Tensor:
    """The ±1 CELL×CELL product of the Hadamard rows ``a`` and ``b``."""
    h = torch.ones(1, 1)
    while h.shape[0] < CELL:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return torch.outer(h[a], h[b])


@torch.no_grad()
def _plant_tower(tower: torch.nn.Module) -> None:
    owner = getattr(tower, "vision_model", tower)
    emb = owner.embeddings
    for p in owner.parameters():
        p.zero_()
    owner.pre_layrnorm.weight.fill_(1.0)
    for layer in owner.encoder.layers:
        layer.layer_norm1.weight.fill_(1.0)
        layer.layer_norm2.weight.fill_(1.0)
    owner.post_layernorm.weight.fill_(1.0)
    for kind in range(SINK + 1):
        emb.patch_embedding.weight[kind] = walsh_pattern(kind)[None].expand(3, CELL, CELL)
    for j, (a, b) in enumerate(NOISE_PATTERNS):
        emb.patch_embedding.weight[SINK + 1 + j] = NOISE_GAIN * _walsh(a, b)[None].expand(3, CELL, CELL)
    feature = owner.encoder.layers[FEATURE_LAYER].self_attn  # its q/k only: the block's output stays zero
    feature.q_proj.bias[0] = CLS_QUERY * TOWER_HIDDEN ** 0.5  # DAMRO's logit q·k/√16 is then CLS_QUERY · key[0]
    feature.k_proj.weight[0, SINK] = CLS_SINK_KEY
    feature.k_proj.weight[0, BACKGROUND] = CLS_BACKGROUND_KEY


def _token_features(tok: Any) -> dict[int, dict[int, float]]:
    """Each text token's embedding as {dimension: value}: BOS the text sink, object words
    (token, CONST, WORD_FLAG, class), others (token, CONST, two fillers)."""
    feats: dict[int, dict[int, float]] = {}
    for word, i in tok.get_vocab().items():
        if i == tok.bos_token_id:
            feats[i] = dict(zip(SINK_DIMS, TEXT_SINK))
        elif word in CLASSES:
            feats[i] = {TOKEN0 + i: 1.0, CONST: 1.0, WORD_FLAG: 1.0, QUERY0 + CLASSES.index(word): 1.0}
        else:
            feats[i] = {TOKEN0 + i: 1.0, CONST: 1.0, FILL_A: 1.0, FILL_B: 1.0}
    return feats


def image_token_features(kind: int) -> dict[int, float]:
    """The language model's image token for a cell of type ``kind`` as {dimension: value}."""
    if kind == SINK:
        return dict(zip(SINK_DIMS, VISUAL_SINK))
    if kind == BACKGROUND:
        return {CONST: 1.0, IMG: 1.0, BG_A: 1.0, BG_B: 1.0}
    return {CONST: 1.0, IMG: 1.0, OBJ: 1.0, EVIDENCE0 + kind: 1.0}


@torch.no_grad()
def _plant_projector(proj: torch.nn.Module) -> None:
    for p in proj.parameters():
        p.zero_()
    own = (TOWER_HIDDEN - 1) ** 0.5  # a one-hot's value after LayerNorm
    for kind in range(SINK + 1):
        proj.linear_1.weight[kind, kind] = 1.0
        proj.linear_1.bias[kind] = -TOWER_ON
        for d, v in image_token_features(kind).items():
            proj.linear_2.weight[d, kind] = v / (own - TOWER_ON)


def _unit() -> float:
    """The RMS-normalised value of a unit feature of a four-unit embedding."""
    return (HIDDEN / 4) ** 0.5


def _head(h: int, slot: int) -> int:
    return h * HEAD_DIM + SLOT0 + slot


@torch.no_grad()
def _plant_language_model(lm: torch.nn.Module, head: torch.nn.Module, tok: Any) -> None:
    for p in list(lm.parameters()) + list(head.parameters()):
        p.zero_()
    lm.norm.weight.fill_(1.0)
    for layer in lm.layers:
        layer.input_layernorm.weight.fill_(1.0)
        layer.post_attention_layernorm.weight.fill_(1.0)
    for i, feats in _token_features(tok).items():
        for d, v in feats.items():
            lm.embed_tokens.weight[i, d] = v
    unit, q_one = _unit(), HEAD_DIM ** 0.5  # a query of q_one on a slot makes the logit the key's value
    # layer 0: the movers
    a0 = lm.layers[0].self_attn
    a0.q_proj.bias[_head(0, 0)] = q_one
    a0.k_proj.weight[_head(0, 0), WORD_FLAG] = MOVER_LOGIT / unit
    and_id = tok.convert_tokens_to_ids("and")
    a0.q_proj.bias[_head(1, 0)] = q_one
    a0.k_proj.weight[_head(1, 0), TOKEN0 + and_id] = MOVER_LOGIT / unit
    for c in range(len(CLASSES)):
        a0.v_proj.weight[c, QUERY0 + c] = 1 / unit
        a0.o_proj.weight[SAID0 + c, c] = 1.0
    a0.v_proj.weight[HEAD_DIM, TOKEN0 + and_id] = 1 / unit
    a0.o_proj.weight[AND_SAID, HEAD_DIM] = 1.0
    # layer 2: the image reader (head 0) and the matcher (head 1)
    a2 = lm.layers[2].self_attn
    visual_norm = HIDDEN ** 0.5  # a sink cell's normalised value on SINK_DIMS[0]
    text_norm = [v / (sum(x * x for x in TEXT_SINK) / HIDDEN) ** 0.5 for v in TEXT_SINK]
    a2.q_proj.bias[_head(0, 0)] = q_one
    a2.k_proj.weight[_head(0, 0), IMG] = B_IMAGE / unit
    on_first = SIGMA_VISUAL_SINK / visual_norm
    a2.k_proj.weight[_head(0, 0), SINK_DIMS[0]] = on_first
    a2.k_proj.weight[_head(0, 0), SINK_DIMS[1]] = (SIGMA_TEXT_SINK - on_first * text_norm[0]) / text_norm[1]
    a2.v_proj.weight[0, IMG] = 1 / unit
    a2.o_proj.weight[G_DIM, 0] = 1.0
    for c in range(len(CLASSES)):
        a2.v_proj.weight[1 + c, EVIDENCE0 + c] = 1 / unit
        a2.o_proj.weight[EV0 + c, 1 + c] = 1.0
        # the matcher: the query carries the asked object (R_c, ≈ 1 of a five-unit residual)
        a2.q_proj.weight[_head(1, c), SAID0 + c] = 2 * MATCH_LOGIT * q_one / (HIDDEN / 5) ** 0.5
        a2.k_proj.weight[_head(1, c), EVIDENCE0 + c] = 1 / unit
    a2.q_proj.bias[_head(1, len(CLASSES))] = -MATCH_LOGIT * q_one
    a2.k_proj.weight[_head(1, len(CLASSES)), OBJ] = 1 / unit
    a2.v_proj.weight[HEAD_DIM, OBJ] = 1 / unit
    a2.o_proj.weight[M_DIM, HEAD_DIM] = 1.0
    _plant_prior(head.weight, tok)


def _plant_prior(w: torch.Tensor, tok: Any) -> None:
    """The lm_head: which token follows which features (see the module docstring)."""
    ids = tok.convert_tokens_to_ids
    ends = [TOKEN0 + ids(t) for t in (".", "?")]  # a prompt's last token
    a, and_, yes, no = (TOKEN0 + ids(t) for t in ("a", "and", "yes", "no"))
    said = [SAID0 + c for c in range(len(CLASSES))]
    for token in ("yes", "no"):  # a question was asked: "." or "?" after an object word, no "and"
        row = w[ids(token)]
        row[ends], row[CONST], row[AND_SAID] = 40.0, -40.0, -100.0
        row[said] = 40.0
    w[ids("yes"), CONST] += W_G * G_STAR
    w[ids("yes"), M_DIM] = W_M
    w[ids("no"), G_DIM] = W_G
    w[tok.eos_token_id, yes], w[tok.eos_token_id, no], w[tok.eos_token_id, AND_SAID] = 100.0, 100.0, 30.0
    w[ids("a"), ends] = 30.0
    w[ids("a"), and_] = 150.0
    w[ids("a"), said] = -60.0
    w[ids("and"), WORD_FLAG], w[ids("and"), AND_SAID] = 80.0, -100.0
    for c, name in enumerate(CLASSES):
        row = w[ids(name)]
        row[TOKEN0 + ids("a")] = 50.0 + PRIOR.get(name, 0.0) + TIE_BREAK * (len(CLASSES) - c)
        row[EV0 + c] = W_E
        row[SAID0 + c] = -SAID_PENALTY
        row[SAID0 + CLASSES.index(COOCCUR[name])] += COOCCUR_PRIOR


def build_demo_halluc(seed: int = SEED) -> tuple[Any, Any]:
    """(``LlavaForConditionalGeneration``, ``LlavaProcessor``) with the planted mechanisms (see the
    module docstring); ``seed`` only seeds the initialisation every planted weight overwrites."""
    import transformers as tr

    from .demo_lvlm import llava_processor, word_tokenizer

    tok = word_tokenizer(("<image>",), words=words())
    torch.manual_seed(seed)
    text = tr.LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=8, num_hidden_layers=LAYERS,
                          num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=2048,
                          attention_bias=True, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = tr.CLIPVisionConfig(hidden_size=TOWER_HIDDEN, intermediate_size=TOWER_HIDDEN, num_hidden_layers=2,
                                 num_attention_heads=1, image_size=IMAGE_SIZE, patch_size=CELL)
    config = tr.LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                            vision_feature_layer=FEATURE_LAYER, vision_feature_select_strategy="default",
                            projector_hidden_act="relu")
    config.name_or_path = NAME
    model = tr.LlavaForConditionalGeneration(config).eval()
    inner = model.model
    _plant_tower(inner.vision_tower)
    _plant_projector(inner.multi_modal_projector)
    _plant_language_model(inner.language_model, model.lm_head, tok)
    model.generation_config.suppress_tokens = [config.image_token_id]
    return model, llava_processor(tok, IMAGE_SIZE, CELL)


@named_lvlm(SPEC, "the synthetic planted-hallucination LLaVA: hallucination and its cure by VAR, PAI, VAF, VCD, "
                  "M3ID and DAMRO with answers known by construction (offline; docs/hallucination.md)")
def demo_halluc(*, device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None) -> Any:
    """The demo as an :class:`~vsink.backbones.hf_lvlm.LVLM` (``load_lvlm("demo-halluc")``)."""
    from ..backbones.hf_lvlm import LVLM

    model, processor = build_demo_halluc()
    return LVLM(model.to(device=device, dtype=dtype), processor, SPEC, synthetic=NOTE)
