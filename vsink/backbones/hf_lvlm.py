"""The LVLM adapter: a Hugging Face vision-language model behind vsink's interface.

:class:`LVLM` holds what every family shares — decoder layers found by structure, the image token
id, image spans, processor inputs, sink dimensions, the vision tower as a vision backbone. A family
(one file each: ``lvlm_llava.py``, ``lvlm_llava_next.py``, ``lvlm_qwen2_vl.py``, ``lvlm_idefics3.py``,
``lvlm_qwen2_5_vl.py``, or a plugin's) subclasses it, registers with
:func:`~vsink.backbones.lvlm_families.lvlm_family` and overrides the methods where its model
differs. ``LVLM(model, processor)`` builds the adapter of the family that accepts the model.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import torch
from PIL import Image
from torch import nn

from ..arguments import instance_arg
from ..errors import ModelSpecError, VsinkError
from ..layout import ImageSpans
from ..viewbox import ViewBox, pad_colour
from .device_map import DeviceMap, device_map_kwargs, device_map_main
from .lvlm_families import family_of_model, family_of_type, named_lvlms, sink_dims_by_name, supported_types
from .registry import resolve_device
from .remote_code import is_remote_code_refusal, refused


#: ``fn(visual_pos_masks [B, N] bool, features [image tokens of the batch, D] per DeepStack layer)``,
#: called on every forward of the language model (``(None, [])`` when it injects nothing); returning
#: True takes the injection over: the model then adds nothing and the caller adds the features
DeepStackObserver = Callable[[Optional[torch.Tensor], list[torch.Tensor]], Optional[bool]]


class UnavailableFamily(ModelSpecError):
    """The model's LVLM family cannot run with the installed transformers (class absent, or a
    release whose model the family does not follow)."""


class LVLM:
    """A Hugging Face LVLM behind vsink's interface (see the module docstring).

    Attributes:
        model: the ``...ForConditionalGeneration`` module (eval mode).
        processor: its processor (or None when only token ids are passed in).
        layers: the decoder layers, in order.

    A family sets the class attributes below and overrides the methods where its model differs
    (the defaults suit a LLaVA-like model: one image span per image, a square grid, 1-D positions).
    """

    #: the family's name (``vsink models``), its models' usual name and an example spec
    family: ClassVar[str] = "?"
    title: ClassVar[str] = ""
    example: ClassVar[str] = ""
    #: the ``config.model_type`` values it adapts
    model_types: ClassVar[tuple[str, ...]] = ()
    #: the transformers class that loads them (``transformers.<model_class>.from_pretrained``)
    model_class: ClassVar[str] = ""
    #: what was verified here, for ``vsink models`` and the README
    verified: ClassVar[str] = "tiny offline models only; real weights not verified here"
    #: mitigations the family refuses, with the one-line reason (``{"fastv": "why"}``)
    refuses: ClassVar[dict[str, str]] = {}
    #: the oldest transformers release whose model this family follows (None: any with ``model_class``),
    #: and why older ones are refused
    min_transformers: ClassVar[Optional[str]] = None
    min_transformers_reason: ClassVar[str] = ""
    #: M-RoPE: 3 rows of position ids (time, height, width), as Qwen2-VL
    mrope: ClassVar[bool] = False
    #: its vision tower is a vsink vision backbone (:meth:`vision_backbone`; test-time registers need it)
    tower_is_backbone: ClassVar[bool] = True
    #: its tower has a class token and its patches reach the language model one to one (LLaVA-1.5;
    #: DAMRO's paper rule applies to a plugin family that declares it)
    patches_one_to_one: ClassVar[bool] = False
    #: an image may reach the prompt as several runs of image tokens: sub-images, then the global
    #: image, each introduced by the processor's ``fake_image_token`` (Idefics3, SmolVLM)
    splits_images: ClassVar[bool] = False
    #: the ``token_type_ids`` value of a generated token, for a pass without the KV cache that runs
    #: prompt and generated tokens together outside transformers' ``generate`` (a branch); None
    #: leaves the prompt's types as they are (a model that reads them only over the prompt)
    generated_token_type: ClassVar[Optional[int]] = None

    def __new__(cls, model: Optional[nn.Module] = None, *args: Any, **kwargs: Any) -> "LVLM":
        """``LVLM(model, ...)`` builds the adapter of the family that accepts ``model`` (plugins first)."""
        if cls is LVLM and model is not None:
            owner = family_of_model(model)
            if owner is None:
                spec = kwargs.get("spec", args[1] if len(args) > 1 else "hf:<module>")
                model_type = getattr(getattr(model, "config", None), "model_type", None)
                raise VsinkError(f"{spec}: model type {model_type!r} is not a supported LVLM; supported: "
                                 f"{', '.join(supported_types())}")
            cls = owner
        return super().__new__(cls)

    @classmethod
    def can_wrap(cls, model: nn.Module) -> bool:
        """Whether this family adapts the built ``model`` (default: its config's model type)."""
        return getattr(getattr(model, "config", None), "model_type", None) in cls.model_types

    @classmethod
    def unavailable(cls) -> Optional[str]:
        """Why this family cannot run with the installed transformers (one line), or None."""
        import transformers
        from packaging.version import Version

        if not hasattr(transformers, cls.model_class):
            return f"transformers {transformers.__version__} has no {cls.model_class} (the {cls.family} family)"
        if cls.min_transformers and Version(transformers.__version__) < Version(cls.min_transformers):
            return (f"the {cls.family} family needs transformers >= {cls.min_transformers} (installed: "
                    f"{transformers.__version__}): {cls.min_transformers_reason}")
        return None

    def __init__(self, model: nn.Module, processor: Any = None, spec: str = "hf:<module>", *,
                 synthetic: Union[bool, str] = False):
        why = self.unavailable()
        if why is not None:
            raise UnavailableFamily(f"{spec}: {why}")
        self.model, self.processor, self.spec = model.eval(), processor, spec
        #: True for a synthetic model (planted mechanisms, meaningless text); ``synthetic_note``: what was planted
        self.synthetic = bool(synthetic)
        self.synthetic_note: Optional[str] = synthetic if isinstance(synthetic, str) else (
            "a synthetic model" if synthetic else None)
        self.model_type = getattr(model.config, "model_type", None)
        self.text_config = model.config.get_text_config()
        self.layers = self._find_layers()
        self._vision: Optional[Any] = None
        #: why no processor was loaded (``processor`` None), for the error :meth:`prepare` raises
        self.processor_error: Optional[str] = None

    # --- structure ----------------------------------------------------------------------
    def _find_layers(self) -> list[nn.Module]:
        """The decoder layers, found by structure: ``num_hidden_layers`` layers with a ``self_attn``
        whose query projection reads the text hidden size (a vision tower of the same depth is not
        taken for them)."""
        n, width = self.text_config.num_hidden_layers, self.text_config.hidden_size

        def reads_text(layer: nn.Module) -> bool:
            q = getattr(getattr(layer, "self_attn", None), "q_proj", None)
            return isinstance(q, nn.Linear) and q.in_features == width

        for _, module in self.model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == n and all(reads_text(layer) for layer in module):
                return list(module)
        raise VsinkError(f"{self.spec}: could not find {n} decoder layers with a self_attn module")

    def attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.layers]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def context_length(self) -> Optional[int]:
        """Most positions the language model takes (``max_position_embeddings`` of its text
        config), or None when the config does not say."""
        n = getattr(self.text_config, "max_position_embeddings", None)
        return int(n) if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None

    def check_context(self, prompt_tokens: int, max_new_tokens: int = 0) -> None:
        """Refuse, in one line naming the limit, a prompt of ``prompt_tokens`` (image tokens
        included) that with ``max_new_tokens`` more would go past :attr:`context_length`."""
        limit = self.context_length
        if limit is None:
            return
        where = f"{self.spec}'s context of {limit:,} tokens (max_position_embeddings)"
        if prompt_tokens > limit:
            raise VsinkError(f"the prompt is {prompt_tokens:,} tokens with its image, beyond {where}: shorten it")
        if prompt_tokens + max_new_tokens > limit:
            raise VsinkError(f"max_new_tokens {max_new_tokens:,} after a prompt of {prompt_tokens:,} tokens goes beyond "
                             f"{where}: at most {limit - prompt_tokens:,} here")

    @property
    def image_token_id(self) -> int:
        cfg = self.model.config
        for name in ("image_token_id", "image_token_index"):
            if getattr(cfg, name, None) is not None:
                return int(getattr(cfg, name))
        raise VsinkError(f"{self.spec}: the config names no image token id")

    @property
    def cache_argument(self) -> str:
        """The model's KV-cache keyword: ``cache`` (transformers 5) or ``past_key_values`` (4.x)."""
        return "cache" if "cache" in self._forward_parameters() else "past_key_values"

    @property
    def device(self) -> torch.device:
        """Where inputs go: the model's one device, or under a device map (accelerate) the first
        accelerator it places modules on (``cpu`` when it places them only on cpu / disk, whose
        offloaded weights sit on the ``meta`` device between uses), as transformers' dispatch does."""
        placed = getattr(self.model, "hf_device_map", None)
        if placed:
            return device_map_main(placed)
        return next(self.model.parameters()).device

    def image_spans(self, input_ids: torch.Tensor) -> ImageSpans:
        """Image-token runs per batch row (``input_ids == image_token_id``)."""
        return ImageSpans.from_ids(input_ids, self.image_token_id)

    def text_position_ids(self, attention_mask: torch.Tensor, last: int) -> torch.Tensor:
        """Position ids of the last ``last`` tokens of a text-only, left-padded sequence (Qwen2-VL:
        the same positions on its three M-RoPE rows)."""
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -last:]
        return pos[None].expand(3, -1, -1) if self.mrope else pos

    # --- branches (vsink.lvlm.branches) -----------------------------------------------------
    def prompt_positions(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The position ids of a left-padded prompt batch as the model's own generation computes
        them, and per row the offset [B, 1] of the tokens after it (a token with ``i`` real tokens
        before it sits at ``i + offset``). Qwen2-VL / Qwen2.5-VL: the model's ``get_rope_index``
        on these inputs (3-row M-RoPE), the offset one past each row's largest position; text-only
        rows: the same position on the three rows."""
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        offset = torch.zeros(ids.shape[0], 1, dtype=torch.long, device=ids.device)
        if not self.mrope:
            return text, offset
        if inputs.get("image_grid_thw") is None:
            return text[None].expand(3, -1, -1), offset
        import inspect

        core = getattr(self.model, "model", self.model)
        wanted = set(inspect.signature(core.get_rope_index).parameters)
        kwargs = {k: v for k, v in inputs.items() if k in wanted and k not in ("input_ids", "attention_mask")}
        positions, _ = core.get_rope_index(ids, attention_mask=mask, **kwargs)
        # the next token sits one past the row's largest position; transformers releases differ in
        # what their rope_deltas count (padded or real tokens), so the offset is derived here
        top = positions.masked_fill(mask[None] == 0, 0).amax(dim=(0, 2))
        return positions, (top + 1 - mask.long().sum(-1)).reshape(-1, 1).to(ids.device)

    def step_positions(self, attention_mask: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The position ids [B, 1] (M-RoPE: [3, B, 1]) of the last token of ``attention_mask``,
        with the ``offset`` of :meth:`prompt_positions`."""
        pos = attention_mask.long().sum(-1, keepdim=True) - 1 + offset
        return pos[None].expand(3, -1, -1) if self.mrope else pos

    def read_out(self, hidden: torch.Tensor, norm: bool = True) -> torch.Tensor:
        """Decoder hidden states [..., D] through the language model's final norm (``norm``) and
        its LM head: the logits an earlier layer would give."""
        if norm:
            hidden = self.final_norm()(hidden)
        return self.model.get_output_embeddings()(hidden)

    def final_norm(self) -> nn.Module:
        """The language model's norm after its last decoder layer (the module holding the layers' ``norm``)."""
        first = self.layers[0]
        for _, module in self.model.named_modules():
            layers = getattr(module, "layers", None)
            if isinstance(layers, nn.ModuleList) and len(layers) and layers[0] is first:
                norm = getattr(module, "norm", None)
                if isinstance(norm, nn.Module):
                    return norm
        raise VsinkError(f"{self.spec}: cannot find the language model's final norm")

    def attention_groups(self, inputs: dict[str, Any]) -> Optional[torch.Tensor]:
        """The prompt's bidirectional blocks [B, N] as the model's own mask has them (tokens of one
        group ``>= 0`` attend to each other in both directions; ``-1``: causal), or None for a
        causal model (the default)."""
        return None

    def deepstack_layers(self) -> list[int]:
        """The decoder layers after whose output the model itself adds vision features at the image
        positions (DeepStack: Qwen3-VL); default none."""
        return []

    def deepstack_tower_blocks(self) -> list[int]:
        """The tower blocks whose features :meth:`deepstack_layers` receive, in the same order."""
        return []

    def observe_deepstack(self, fn: DeepStackObserver) -> Optional[Any]:
        """Install ``fn`` on every forward that injects DeepStack features (see
        :data:`DeepStackObserver`); returns a handle with ``remove()``, or None (default: a model
        without DeepStack)."""
        return None

    def inject_deepstack(self, masks: torch.Tensor, features: torch.Tensor) -> AbstractContextManager:
        """Within the context, every forward of the language model adds ``features`` [B, levels, n,
        D] (each row's ``n`` image tokens, per DeepStack level) at the positions ``masks`` [B, N]
        (``n`` per row) after its first decoder layers, as the model does for its own image (a
        branch whose image is not the model's to encode). Default: refused, no DeepStack."""
        raise VsinkError(f"{self.spec}: its family has no DeepStack to inject")

    def image_grid(self, inputs: dict[str, Any], row: int, count: int) -> tuple[int, int]:
        """(rows, cols) of a row's image tokens as a picture: a square when the count is one, else
        1 × count (families with a known grid override this)."""
        side = int(round(count ** 0.5))
        return (side, side) if side * side == count else (1, count)

    def span_grids(self, inputs: dict[str, Any], row: int, spans: ImageSpans) -> list[tuple[int, int]]:
        """(rows, cols) of each of row ``row``'s image spans as a picture (:meth:`image_grid` of each
        span's count): a family whose image is several spans (LLaVA-OneVision's base and tiled
        views, Idefics3's squares) gives each its own grid."""
        return [self.image_grid(inputs, row, end - start) for start, end in spans.spans[row]]

    def overview_span(self, inputs: dict[str, Any], row: int, spans: ImageSpans) -> Optional[int]:
        """Which of row ``row``'s image spans alone shows the whole :meth:`view_box` on its grid
        (the export draws its step overlays from it), or None: the row's image tokens together
        (the default: one span per image)."""
        return None

    def view_box(self, size: Sequence[int]) -> ViewBox:
        """The region of a ``(width, height)`` image this model's processor feeds to the model, in
        the image's pixels (:mod:`vsink.viewbox`); default: the whole image (tiles, ``smart_resize``)."""
        return ViewBox.full(size)

    def view_fill(self) -> tuple[int, int, int]:
        """The colour the processor pads with, for drawing a view box that reaches outside the image."""
        return pad_colour(getattr(self.processor, "image_processor", None))

    def vision_backbone(self):
        """The vision tower as a vsink vision :class:`~vsink.backbones.base.Backbone` (CLIP /
        SigLIP towers of LLaVA models), so ``vsink scan`` and ``maps`` work on it (one object per
        LVLM: its sites and routes are shared by everything that uses the tower)."""
        from .hf_vision import HFVisionBackbone

        if self._vision is None:
            tower = self.vision_tower()
            if tower is None:
                raise VsinkError(f"{self.spec}: its vision tower ({self.model_type}) is not a supported vision backbone")
            self._vision = HFVisionBackbone(tower, f"{self.spec}#vision_tower")
        return self._vision

    def vision_tower(self) -> Optional[nn.Module]:
        """The vision tower module (default: ``vision_tower`` of the model or its inner model)."""
        return getattr(getattr(self.model, "model", self.model), "vision_tower", None)

    def known_sink_dims(self) -> Optional[list[int]]:
        """The sink dimensions of this model if it is a known one (by its name, see
        :func:`~vsink.backbones.lvlm_families.known_sink_dims`), else None."""
        name = str(getattr(self.model.config, "_name_or_path", "")).lower()
        for key, dims in sink_dims_by_name().items():
            if key in name:
                return list(dims)
        return None

    def sink_dimensions(self, given: Optional[Sequence[int]] = None) -> list[int]:
        """``given``, else the known dimensions of this model, else a clear error."""
        dims = list(given) if given else self.known_sink_dims()
        if not dims:
            raise VsinkError(f"{self.spec}: no sink dimensions known for this model; run "
                             "'vsink lvlm calibrate' and pass them (--set sink_dims=[...] or a calibration JSON)")
        bad = [d for d in dims if not 0 <= int(d) < self.hidden_size]
        if bad:
            raise VsinkError(f"sink dimensions {bad} outside the hidden size {self.hidden_size}")
        return [int(d) for d in dims]

    def tower_patches_are_image_tokens(self, layout: Any) -> bool:
        """Whether the tower's patch tokens reach the language model one to one, in order, as the
        image tokens of ``layout`` (default no: tiles, merges and pixel shuffles break it)."""
        return False

    @classmethod
    def load_model(cls, repo: str, config: Any, **kwargs: Any) -> nn.Module:
        """The model of ``repo`` (``transformers.<model_class>.from_pretrained``)."""
        import transformers

        why = cls.unavailable()
        if why is not None:
            raise UnavailableFamily(f"hf:{repo}: {why}")
        return getattr(transformers, cls.model_class).from_pretrained(repo, **kwargs)

    # --- inputs -------------------------------------------------------------------------
    def prepare(self, images: Sequence[Image.Image], prompts: Sequence[str], *,
                options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Images + prompts → model inputs with the model's processor (left padding for batches).
        A prompt without the image placeholder gets the model's chat template if it has one,
        else the image token in front. A prompt beyond the model's context is refused
        (:meth:`check_context`). ``options``: keyword arguments for the processor call (a scan
        passes :meth:`scan_options`)."""
        if self.processor is None:
            why = f" ({self.processor_error})" if self.processor_error else ""
            raise VsinkError(f"{self.spec}: no processor was loaded{why}; pass input_ids and pixel_values yourself")
        if len(images) != len(prompts):
            raise VsinkError(f"got {len(images)} images for {len(prompts)} prompts")
        placeholder = self.placeholder()
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise VsinkError(f"prompt {i}: must be text, got {prompt!r}")
            if prompt.count(placeholder) > 1:
                raise VsinkError(f"prompt {i} has {prompt.count(placeholder)} {placeholder!r} placeholders for its one "
                                 f"image; write one, or none (vsink then adds it)")
        texts = [self._format(p) for p in prompts]
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"
        inputs = self.processor(images=self.processor_images(images), text=texts, return_tensors="pt", padding=True,
                                **(options or {}))
        self.check_context(int(inputs["input_ids"].shape[1]))
        accepted = self._forward_parameters()
        # some tokenizers add token_type_ids, which LLaVA's forward (and transformers 4.x's
        # generate) do not take (PaliGemma's and Gemma 3's do: their bidirectional blocks); labels
        # (PaliGemma's processor) are for training
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()
                if k != "labels" and (k != "token_type_ids" or k in accepted)}

    def pixel_counts(self, inputs: dict[str, Any]) -> Optional[list[int]]:
        """How many entries of ``pixel_values``' first dimension each batch row owns, where that is
        not one per row (Qwen2-VL's flattened patches, by ``image_grid_thw``; InternVL's tiles), or
        None: one per row. Mitigations that cut a batch into rows or images (VCD's noise, OPERA's
        rows) cut ``pixel_values`` by it."""
        grid = inputs.get("image_grid_thw")
        return None if grid is None else [int(n) for n in grid.prod(-1)]

    def tower_inputs(self, inputs: dict[str, Any]) -> Optional[list[torch.Tensor]]:
        """Each batch row's inputs to the vision tower, ``[T, 3, H, W]``, in the order the model
        encodes them (row after row, one tower input per ``[3, H, W]``), or None where the tower does
        not take such inputs one by one (packed patches, or a family that does not say how it cuts
        ``pixel_values``). Default: a ``[B, 3, H, W]`` ``pixel_values`` with one entry per row
        (LLaVA-1.5 style: ``T`` = 1)."""
        pixels = inputs.get("pixel_values")
        rows = int(inputs["input_ids"].shape[0]) if "input_ids" in inputs else None
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or self.pixel_counts(inputs) is not None \
                or pixels.shape[0] != rows:
            return None
        return [pixels[i:i + 1] for i in range(rows)]

    def scan_options(self) -> dict[str, Any]:
        """Processor options for ``vsink scan --prompt`` (a scan's layout needs one image span per
        row; families that split an image into separate runs turn that off here). Default: none."""
        return {}

    def placeholder(self) -> str:
        """The text that marks where the image goes in a prompt (the processor's ``image_token``)."""
        return getattr(self.processor, "image_token", "<image>")

    def processor_images(self, images: Sequence[Image.Image]) -> Any:
        """The images as the processor takes them with one prompt each (default: a flat list)."""
        return list(images)

    def _forward_parameters(self) -> set[str]:
        import inspect

        return set(inspect.signature(self.model.forward).parameters)

    def _format(self, prompt: str) -> str:
        placeholder = self.placeholder()
        if placeholder in prompt:
            return prompt
        if getattr(self.processor, "chat_template", None):
            conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(conv, add_generation_prompt=True)
        return f"{placeholder}\n{prompt}"


def lvlm_arg(value: Any, name: str = "lvlm") -> LVLM:
    """``value`` if it is an :class:`LVLM`, else one error naming ``name`` (a spec string: load it
    first; :func:`vsink.arguments.instance_arg`)."""
    fix = f"load it first, load_lvlm({str(value)!r})" if isinstance(value, (str, os.PathLike)) else ""
    return instance_arg(value, LVLM, name, "an LVLM (from vsink.backbones.hf_lvlm.load_lvlm)", fix)


def _one_line(error: Exception) -> str:
    """An exception's message with its line breaks folded (the hub's messages span lines)."""
    return " ".join(str(error).split())


def _refuse_vision_spec(repo: str) -> None:
    """A vision model spec (``demo``, ``timm:...``, ``open_clip:...``: a named spec or a family
    prefix other than ``hf``, which LVLMs share) where an LVLM is expected: say so, instead of
    asking the hub for a repository of that name."""
    from .families import families, named_specs

    prefix = repo.split(":", 1)[0] if ":" in repo else None
    if repo in named_specs() or (prefix in families() and prefix != "hf"):
        named = ", ".join(f"{spec} (offline)" for spec in named_lvlms())
        raise ModelSpecError(f"{repo!r} is a vision model; an LVLM is needed here: {named}, hf:REPO "
                             f"({', '.join(supported_types())}) or a local directory of one (see 'vsink models')")


def load_lvlm(repo: str, *, device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None,
              trust_remote_code: bool = False, device_map: Optional[DeviceMap] = None,
              offload_folder: Optional[Union[str, os.PathLike]] = None) -> LVLM:
    """Load an LVLM and its processor from a hub id or local directory (``from_pretrained``, by the
    family registered for its model type), or build a named one (``"demo-llava"``, ``"demo-halluc"``,
    offline). ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"`` (CUDA if available),
    checked before anything is loaded; ``dtype`` ``None`` keeps the checkpoint's own.
    ``trust_remote_code`` is passed through only when the caller asks for it (``True``; anything else
    refuses a model that ships its own code). ``device_map`` (needs ``accelerate``; see
    :func:`vsink.backbones.device_map.device_map_arg`) places the model's modules across devices,
    CPU and disk (``offload_folder``) instead of moving it whole to ``device``."""
    import transformers

    device = resolve_device(device)
    placement = device_map_kwargs(device_map, offload_folder, repo)
    named = named_lvlms().get(repo)
    if named is not None:
        if placement:
            raise VsinkError(f"--device-map: {repo!r} is built in memory; give a saved model (hf:REPO or a directory)")
        return named.builder(device=device, dtype=dtype)

    _refuse_vision_spec(repo)
    trust_remote_code = trust_remote_code is True  # never None: transformers would ask on stdin
    try:
        config = transformers.AutoConfig.from_pretrained(repo, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if is_remote_code_refusal(e):
            raise refused(f"hf:{repo}", "--trust-remote-code (trust_remote_code=True)") from None
        raise ModelSpecError(f"hf:{repo}: cannot load a config ({_one_line(e)})") from None
    owner = family_of_type(config.model_type)
    if owner is None:
        raise ModelSpecError(f"hf:{repo}: model type {config.model_type!r} is not a supported LVLM "
                             f"({', '.join(supported_types())})")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = owner.load_model(repo, config, **kwargs, **placement) if placement else \
            owner.load_model(repo, config, **kwargs).to(device)
    except OSError as e:
        raise ModelSpecError(f"hf:{repo}: cannot load the model ({_one_line(e)})") from None
    except ValueError as e:
        if not placement:
            raise
        raise VsinkError(f"hf:{repo}: --device-map: {_one_line(e)}") from None
    processor, why = None, None
    try:
        processor = transformers.AutoProcessor.from_pretrained(repo, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        why = (_PROCESSOR_CODE if is_remote_code_refusal(e) and not trust_remote_code else
               f"the processor could not be loaded: {_one_line(e)}")
    lvlm = owner(model, processor, f"hf:{repo}")
    lvlm.processor_error = why
    return lvlm


#: why :func:`load_lvlm` left the processor out when it ships code of its own
_PROCESSOR_CODE = ("its processor ships its own Python code (auto_map in a processor, image processor or tokenizer "
                   "config); remote code is refused: pass --trust-remote-code (trust_remote_code=True) to allow it")
