"""Small LVLMs built offline from configs, with a word-level tokenizer and the model's own
processor class — SYNTHETIC (random weights): for tests, examples and benchmarks, where no
pretrained LVLM can be downloaded. ``save_pretrained`` on both gives a directory that
``vsink generate --model DIR`` loads like a hub model.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

WORDS = ("a an the is there in image picture photo what color of and yes no cat dog car person red blue green "
         "describe this please answer question one word shape circle square triangle sky tree").split()


def word_tokenizer(extra_special: tuple[str, ...] = (), tokenizer_class: Any = None, words: Sequence[str] = WORDS,
                   named: Optional[dict[str, str]] = None):
    """A whitespace word-level fast tokenizer of ``words`` (``<s>`` BOS, ``</s>`` EOS, ``<pad>``, ``<unk>``), as
    ``tokenizer_class`` under transformers 4.x, whose processors check the class (Qwen2-VL's,
    PaliGemma's); ``PreTrainedTokenizerFast`` otherwise and under transformers 5, which reloads a
    saved ``Qwen2Tokenizer`` / ``GemmaTokenizer`` with that class's own BPE instead of the saved
    word-level model. ``named``: special tokens some processors read as attributes (Gemma 3's
    ``boi_token``, ``image_token``, ...), saved with the tokenizer."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if int(transformers.__version__.split(".")[0]) >= 5:
        tokenizer_class = None

    specials = ["<pad>", "<s>", "</s>", "<unk>", *extra_special]
    vocab = {tok: i for i, tok in enumerate(specials + list(words) + ["?", ".", ","])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = (tokenizer_class or PreTrainedTokenizerFast)(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=list(extra_special), **({"extra_special_tokens": named} if named else {}))
    tok.padding_side = "left"
    return tok


def _llama_and_clip(tok: Any, hidden: int, layers: int, heads: int, kv_heads: int, image_size: int, patch: int):
    """The Llama decoder and CLIP vision tower configs of the tiny LLaVA models."""
    import transformers as tr

    text = tr.LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                          max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = tr.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=image_size, patch_size=patch)
    return text, vision


def build_tiny_llava(*, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                     image_size: int = 32, patch: int = 8, seed: int = 0) -> tuple[Any, Any]:
    """(``LlavaForConditionalGeneration``, ``LlavaProcessor``): a CLIP vision tower and a Llama
    decoder; (image_size / patch)² image tokens per image."""
    import transformers as tr

    tok = word_tokenizer(("<image>",))
    torch.manual_seed(seed)
    text, vision = _llama_and_clip(tok, hidden, layers, heads, kv_heads, image_size, patch)
    config = tr.LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                            vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = tr.LlavaForConditionalGeneration(config).eval()
    # a random model may sample its image placeholder, which transformers 4.x then counts as an image
    # token when it re-encodes the sequence (no cache); a test model never generates it
    model.generation_config.suppress_tokens = [config.image_token_id]
    return model, llava_processor(tok, image_size, patch)


def llava_processor(tok: Any, image_size: int, patch: int) -> Any:
    """A ``LlavaProcessor`` for square ``image_size`` images, CLIP preprocessing, one class token."""
    import transformers as tr

    image_processor = tr.CLIPImageProcessor(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    return tr.LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                             vision_feature_select_strategy="default", image_token="<image>",
                             num_additional_image_tokens=1)


def build_tiny_llava_next(*, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                          image_size: int = 32, patch: int = 8, seed: int = 0) -> tuple[Any, Any]:
    """(``LlavaNextForConditionalGeneration``, ``LlavaNextProcessor``): any-resolution tiling over
    the pinpoints (1×1, 1×2, 2×1 tiles), so the image-token count depends on the aspect ratio."""
    import transformers as tr

    tok = word_tokenizer(("<image>",))
    torch.manual_seed(seed)
    text, vision = _llama_and_clip(tok, hidden, layers, heads, kv_heads, image_size, patch)
    pinpoints = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]
    config = tr.LlavaNextConfig(vision_config=vision, text_config=text,
                                image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                                vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints)
    model = tr.LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.suppress_tokens = [config.image_token_id]  # see build_tiny_llava
    image_processor = tr.LlavaNextImageProcessor(size={"shortest_edge": image_size},
                                                 crop_size={"height": image_size, "width": image_size},
                                                 image_grid_pinpoints=pinpoints)
    processor = tr.LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                                      vision_feature_select_strategy="default", image_token="<image>",
                                      num_additional_image_tokens=1)
    return model, processor


def _qwen_parts(image_size: int) -> tuple[Any, dict[str, int], Any]:
    """What the tiny Qwen-VL models share: the word tokenizer with Qwen's vision tokens, their ids
    (the configs' ``image_token_id`` ...), and an image processor of patch 4, merge 2 that resizes
    an image to image_size² pixels."""
    import transformers as tr

    tok = word_tokenizer(("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"),
                         tokenizer_class=tr.Qwen2TokenizerFast)
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    pixels = image_size * image_size
    image_processor = tr.Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=4, merge_size=2,
                                               temporal_patch_size=2)
    return tok, ids, image_processor


def _qwen_test_generation(model: Any, tok: Any, ids: dict[str, int]) -> None:
    """A random model may sample its vision placeholders, on which transformers 4.x's M-RoPE index
    fails, or end every row at once with EOS; a test model generates neither."""
    model.generation_config.suppress_tokens = sorted([*ids.values(), tok.eos_token_id])


def build_tiny_qwen2_vl(*, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                        image_size: int = 32, seed: int = 0, version: str = "2") -> tuple[Any, Any]:
    """(``Qwen2VLForConditionalGeneration``, ``Qwen2VLProcessor``), or Qwen2.5-VL with
    ``version="2.5"``: patch 4, merge 2, so an image_size² image gives (image_size / 8)² image
    tokens; 3-row M-RoPE."""
    import transformers as tr

    if version not in ("2", "2.5"):
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    tok, ids, image_processor = _qwen_parts(image_size)
    torch.manual_seed(seed)
    half = hidden // heads // 2  # rotary frequencies per head, split over (time, height, width)
    time_part = half // 4
    height_part = (half - time_part) // 2
    section = [time_part, height_part, half - time_part - height_part]
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                rope_scaling={"type": "mrope", "mrope_section": section}, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if version == "2":
        vision = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        config_cls, model_cls, processor_cls = tr.Qwen2VLConfig, tr.Qwen2VLForConditionalGeneration, tr.Qwen2VLProcessor
    else:
        vision = dict(depth=2, hidden_size=32, out_hidden_size=hidden, intermediate_size=64, num_heads=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=16,
                      fullatt_block_indexes=[1])
        config_cls, model_cls = tr.Qwen2_5_VLConfig, tr.Qwen2_5_VLForConditionalGeneration
        processor_cls = tr.Qwen2_5_VLProcessor
    model = model_cls(config_cls(text_config=text, vision_config=vision, **ids)).eval()
    _qwen_test_generation(model, tok, ids)
    video_processor = tr.Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2)
    processor = processor_cls(image_processor=image_processor, tokenizer=tok, video_processor=video_processor)
    return model, processor


def build_tiny_qwen3_vl(*, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                        image_size: int = 32, seed: int = 0, deepstack: Sequence[int] = (0, 1)) -> tuple[Any, Any]:
    """(``Qwen3VLForConditionalGeneration``, ``Qwen3VLProcessor``): Qwen2-VL's patch 4, merge 2
    (an image_size² image gives (image_size / 8)² image tokens), a three-block tower whose blocks
    ``deepstack`` feed DeepStack features into the outputs of the first ``len(deepstack)`` decoder
    layers, a Qwen3 decoder (QK-norm) with interleaved M-RoPE."""
    import transformers as tr

    tok, ids, image_processor = _qwen_parts(image_size)
    torch.manual_seed(seed)
    half = hidden // heads // 2  # rotary frequencies per head; interleaved: height and width take every third
    section = [half - 2 * (half // 4), half // 4, half // 4]
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, rope_theta=5e5,
                rope_scaling={"rope_type": "default", "mrope_section": section, "mrope_interleaved": True})
    vision = dict(depth=3, hidden_size=32, out_hidden_size=hidden, intermediate_size=64, num_heads=2, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=64,
                  deepstack_visual_indexes=list(deepstack))
    model = tr.Qwen3VLForConditionalGeneration(tr.Qwen3VLConfig(text_config=text, vision_config=vision, **ids)).eval()
    _qwen_test_generation(model, tok, ids)
    video_processor = tr.Qwen3VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2)
    processor = tr.Qwen3VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor)
    return model, processor


def build_tiny_llava_onevision(*, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                               image_size: int = 32, patch: int = 8, seed: int = 0) -> tuple[Any, Any]:
    """(``LlavaOnevisionForConditionalGeneration``, ``LlavaOnevisionProcessor``): a SigLIP tower (no
    class token, every patch kept), any-resolution tiles over the pinpoints (1×1 to 2×2 tiles of
    ``image_size``): an image gives its base view's (image_size / patch)² tokens, then its tiles'
    tokens row by row, each row closed by the learned newline feature."""
    import transformers as tr

    tok = word_tokenizer(("<image>", "<video>"))
    torch.manual_seed(seed)
    text, _ = _llama_and_clip(tok, hidden, layers, heads, kv_heads, image_size, patch)
    vision = tr.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=image_size, patch_size=patch)
    s = image_size
    pinpoints = [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
    ids = {"image_token_index": tok.convert_tokens_to_ids("<image>"),
           "video_token_index": tok.convert_tokens_to_ids("<video>")}
    config = tr.LlavaOnevisionConfig(vision_config=vision, text_config=text, vision_feature_select_strategy="full",
                                     vision_feature_layer=-1, image_grid_pinpoints=pinpoints, **ids)
    model = tr.LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config.suppress_tokens = sorted(ids.values())  # see build_tiny_llava
    image_processor = tr.LlavaOnevisionImageProcessor(size={"height": s, "width": s}, image_grid_pinpoints=pinpoints)
    video_processor = tr.LlavaOnevisionVideoProcessor(size={"height": s, "width": s})
    processor = tr.LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tok,
                                           video_processor=video_processor, num_image_tokens=(s // patch) ** 2,
                                           vision_feature_select_strategy="full", image_token="<image>",
                                           video_token="<video>")
    return model, processor


def build_tiny_paligemma(*, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                         image_size: int = 32, patch: int = 8, seed: int = 0, version: int = 2,
                         sliding_window: int = 4096) -> tuple[Any, Any]:
    """(``PaliGemmaForConditionalGeneration``, ``PaliGemmaProcessor``): PaliGemma 2 (a Gemma 2
    decoder: attention-logit soft-capping, sliding-window layers) or, with ``version=1``, PaliGemma
    (Gemma); a SigLIP tower. The prompt is ``image tokens, BOS, text``: the processor marks it all
    as the prefix (``token_type_ids`` 0), over which the decoder attends in both directions."""
    import transformers as tr

    if version not in (1, 2):
        raise ValueError(f"version must be 1 or 2, got {version!r}")
    tok = word_tokenizer(("<image>",), tokenizer_class=tr.GemmaTokenizerFast)
    torch.manual_seed(seed)
    sizes = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                 max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id)
    # PaliGemma 2's Gemma 2: attention logits capped at 50, every other layer a 4096-token sliding
    # window (``sliding_window`` smaller makes those layers drop keys on a tiny prompt)
    text = tr.Gemma2Config(**sizes, sliding_window=sliding_window, attn_logit_softcapping=50.0) if version == 2 else \
        tr.GemmaConfig(**sizes)
    vision = tr.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=image_size, patch_size=patch, projection_dim=hidden)
    config = tr.PaliGemmaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                                projection_dim=hidden, hidden_size=hidden)
    model = tr.PaliGemmaForConditionalGeneration(config).eval()
    model.generation_config.suppress_tokens = [config.image_token_id]  # see build_tiny_llava
    image_processor = tr.SiglipImageProcessor(size={"height": image_size, "width": image_size})
    image_processor.image_seq_length = (image_size // patch) ** 2
    return model, tr.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)


def build_tiny_gemma3(*, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2, image_size: int = 32,
                      patch: int = 8, tokens_per_image: int = 4, seed: int = 0,
                      sliding_window: int = 1024) -> tuple[Any, Any]:
    """(``Gemma3ForConditionalGeneration``, ``Gemma3Processor``): a SigLIP tower average-pooled to
    ``tokens_per_image`` image tokens, a Gemma 3 decoder (QK-norm, sliding-window layers
    alternating with full ones) attending in both directions inside each image's tokens
    (``token_type_ids`` 1). The prompt holds ``<start_of_image>`` where the image goes; the
    processor expands it to start, image tokens, end."""
    import transformers as tr

    specials = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
    tok = word_tokenizer(tuple(specials.values()), named=specials)
    torch.manual_seed(seed)
    text = tr.Gemma3TextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                               head_dim=hidden // heads, query_pre_attn_scalar=hidden // heads,
                               max_position_embeddings=2048, sliding_window=sliding_window,
                               layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2),
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = tr.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=image_size, patch_size=patch)
    ids = {key: tok.convert_tokens_to_ids(value) for key, value in
           (("boi_token_index", specials["boi_token"]), ("eoi_token_index", specials["eoi_token"]),
            ("image_token_index", specials["image_token"]))}
    config = tr.Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=tokens_per_image, **ids)
    model = tr.Gemma3ForConditionalGeneration(config).eval()
    # transformers initialises the projector's matrix at zero (real checkpoints overwrite it): left so,
    # every image feature is 0 and no output depends on the pixels
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, vision.hidden_size ** -0.5)
    model.generation_config.suppress_tokens = sorted(ids.values())  # see build_tiny_llava
    image_processor = tr.Gemma3ImageProcessor(size={"height": image_size, "width": image_size})
    return model, tr.Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=tokens_per_image)


def build_tiny_internvl(*, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2, image_size: int = 32,
                        patch: int = 8, max_tiles: int = 4, seed: int = 0, use_qk_norm: bool = False,
                        norm_type: str = "layer_norm", vision_feature_layer: int = -1) -> tuple[Any, Any]:
    """(``InternVLForConditionalGeneration``, ``InternVLProcessor``): an InternViT tower (class
    token, layer scales; ``use_qk_norm`` / ``norm_type`` as InternViT-6B's), a Qwen2 decoder, the
    patches pixel-shuffled 2×2 (``downsample_ratio`` 0.5): (image_size / patch / 2)² image tokens per
    tile. The image processor cuts an image into 1 to ``max_tiles`` tiles of ``image_size`` (the
    grid closest to its aspect ratio) plus a thumbnail of the whole image when there are several;
    the processor expands the prompt's ``<IMG_CONTEXT>`` to ``<img>``, the tiles' tokens, ``</img>``."""
    import transformers as tr

    specials = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}
    tok = word_tokenizer(tuple(specials.values()), named=specials)
    torch.manual_seed(seed)
    text = tr.Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                          max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = tr.InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=image_size, patch_size=patch, use_qk_norm=use_qk_norm,
                                     norm_type=norm_type, layer_scale_init_value=1.0)
    per_tile = (image_size // patch // 2) ** 2
    config = tr.InternVLConfig(vision_config=vision, text_config=text, downsample_ratio=0.5, image_seq_length=per_tile,
                               image_token_id=tok.convert_tokens_to_ids(specials["context_image_token"]),
                               vision_feature_layer=vision_feature_layer, vision_feature_select_strategy="default")
    model = tr.InternVLForConditionalGeneration(config).eval()
    model.generation_config.suppress_tokens = sorted(tok.convert_tokens_to_ids(list(specials.values())))  # see build_tiny_llava
    size = {"height": image_size, "width": image_size}
    image_processor = tr.GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=max_tiles,
                                               image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    processor = tr.InternVLProcessor(image_processor=image_processor, tokenizer=tok,
                                     video_processor=tr.InternVLVideoProcessor(size=size), image_seq_length=per_tile)
    return model, processor


def build_tiny_idefics3(*, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2, tile: int = 32,
                        patch: int = 8, scale_factor: int = 2, longest_edge: int = 64, splitting: bool = True,
                        seed: int = 0, smolvlm: bool = False) -> tuple[Any, Any]:
    """(``Idefics3ForConditionalGeneration``, ``Idefics3Processor``), or SmolVLM's pair with
    ``smolvlm=True``: a SigLIP-like tower (no class token) on ``tile``-pixel squares, a
    pixel-shuffle connector (``scale_factor``² patches into one token: (tile / patch / scale)²
    image tokens per square), a Llama decoder. With ``splitting`` the processor resizes an image's
    longest edge to ``longest_edge``, cuts it into a grid of ``tile`` squares and adds the whole
    image at ``tile`` (the global image); the prompt then holds, per sub-image,
    ``<fake_token_around_image><row_i_col_j>`` and its image tokens, then the global image's."""
    import transformers as tr

    rows_cols = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))
    specials = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *rows_cols)
    tok = word_tokenizer(specials + (("<video>",) if smolvlm else ()))
    torch.manual_seed(seed)
    text, _ = _llama_and_clip(tok, hidden, layers, heads, kv_heads, tile, patch)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=tile,
                  patch_size=patch)
    sizes = dict(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile},
                 do_image_splitting=splitting)
    seq_len = (tile // patch // scale_factor) ** 2
    image_token_id = tok.convert_tokens_to_ids("<image>")
    if smolvlm:
        config = tr.SmolVLMConfig(vision_config=tr.SmolVLMVisionConfig(**vision), text_config=text,
                                  scale_factor=scale_factor, image_token_id=image_token_id)
        model = tr.SmolVLMForConditionalGeneration(config).eval()
        processor = tr.SmolVLMProcessor(image_processor=tr.SmolVLMImageProcessor(**sizes), tokenizer=tok,
                                        video_processor=tr.SmolVLMVideoProcessor(), image_seq_len=seq_len)
    else:
        config = tr.Idefics3Config(vision_config=tr.Idefics3VisionConfig(**vision), text_config=text,
                                   scale_factor=scale_factor, image_token_id=image_token_id)
        model = tr.Idefics3ForConditionalGeneration(config).eval()
        processor = tr.Idefics3Processor(image_processor=tr.Idefics3ImageProcessor(**sizes), tokenizer=tok,
                                         image_seq_len=seq_len)
    model.generation_config.suppress_tokens = [tok.convert_tokens_to_ids(t) for t in specials[:2]]  # see build_tiny_llava
    return model, processor
