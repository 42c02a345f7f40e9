"""The plugin API: everything a vision family, an LVLM family or a mitigation written outside vsink
needs, from this one module (nothing private to import; ``tests/plugin`` imports only this).

**A vision family** (entry point group ``vsink.backbones``): a :class:`Backbone` subclass decorated
with :func:`family`. It implements the abstract members listed in :data:`BACKBONE_MEMBERS` —
``blocks``, ``num_heads``, ``dynamic_size``, ``_token_counts``, ``_run_model``,
``_mlp_out_proj``, ``final_norm``, ``_parameter_roles``, ``_install_attention`` — and the class
hooks ``can_wrap``, ``from_spec`` (and, to be saved, ``saved_spec`` / ``from_saved``).
``_install_attention(layer)`` replaces the block's attention with a function that computes q, k,
v from the module's own weights and calls ``self._attention(layer, q, k, v, scale=..., mask=...)``
(:data:`ExplicitAttention`: q [B, num_heads, N, d], k and v [B, G, N, d] with G dividing
``num_heads``; anything else is refused naming the block); it returns the undo function.
``@named_spec`` registers one exact spec. Plugin families are asked before vsink's own in
``vsink.wrap`` and ``vsink.load``.

**An LVLM family** (entry point group ``vsink.lvlms``): an :class:`LVLM` subclass decorated with
:func:`lvlm_family`, with ``family``, ``model_types``, ``model_class``, ``verified`` and, where
its model differs from a LLaVA-like one, the members listed in :data:`LVLM_MEMBERS`
(``image_grid``, ``span_grids`` (each image span's own grid), ``overview_span`` (the span the export's
overlays draw), ``view_box``, ``vision_tower``, ``tower_patches_are_image_tokens``, ``text_position_ids``, ``image_spans``, ``attention_groups`` (bidirectional blocks of the prompt),
``placeholder``, ``processor_images``, ``pixel_counts`` (image inputs per row), ``scan_options`` (processor
options for a scan: one image span per row), ``load_model``, ``refuses``, ``mrope``, ``tower_is_backbone``,
``deepstack_layers``, ``deepstack_tower_blocks``, ``observe_deepstack`` (vision features the model
adds after some decoder layers, :data:`DeepStackObserver`), ``inject_deepstack`` (adding them for
a branch's prompt)). ``@named_lvlm`` registers one exact spec, :func:`known_sink_dims` the sink
dimensions of a model known by name. Plugin LVLM families are asked first.

**A mitigation** (entry point group ``vsink.mitigations``): a :class:`Mitigation` subclass
decorated with :func:`register`, with a settings dataclass (:class:`CheckedSettings`, fields
declared with :func:`setting` and a :class:`Kind` each) and ``_install(run, handles)`` adding site
functions (:data:`BlockFn`, :data:`LogitFn`, :data:`ProbFn`, :data:`QKVFn`, with :data:`RowsFn`)
on ``run.decoder`` through ``run.decoder.hook(site, layer, fn, rows=...)``; ``refusal(family)``
says why it does not apply to an LVLM family, ``unavailable()`` why it cannot run with the
installed libraries, ``calibration_settings(calibration)`` what it takes
from a sink calibration. :func:`below_depth` checks a layer setting against the decoder;
:func:`rows_from` makes a ``rows=`` for edits of the queries from an original position on (found by
position, so a pass without the KV cache, which recomputes earlier tokens, edits the rows a cached
pass edited) and :func:`fresh_rows` says which rows a pass computes for the first time (count
those, so a report is the same with and without the cache). A
mitigation that needs extra runs of the prompt declares them with :class:`Branch`
(:func:`image_branch`, :func:`text_branch`, :func:`readout_branch`; see vsink/lvlm/branches.py).

One discovery policy for the three groups (:class:`PluginError`): vsink's own modules first, then
the entry points; a plugin that fails to import is one error naming it, raised when its registry
is first used.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .attention import LogitFn, ProbFn, additive_mask
from .backbones.base import Backbone, module_parameters, to_pair
from .backbones.families import family, named_spec
from .backbones.hf_lvlm import LVLM, DeepStackObserver
from .backbones.hooks import Closer, Hooks, HookSet
from .backbones.lvlm_families import known_sink_dims, lvlm_family, named_lvlm
from .backbones.plugins import PluginError
from .backbones.sites import SITES, RowsFn, SiteFn, SiteHandle, SiteModel
from .backbones.timm import TimmBackbone, load_timm
from .errors import ModelSpecError, VsinkError, VsinkWarning
from .layout import ImageSpans, PromptLayout, TokenLayout
from .mitigate.base import Mitigation, Run, below_depth, fresh_rows, register, rows_from
from .mitigate.branch import Branch, image_branch, readout_branch, text_branch
from .mitigate.settings import CheckedSettings, setting
from .options import AnyOf, Bool, Choice, Float, Int, Kind, ListOf, Text

#: ``block_input`` / ``block_output`` / ``mlp_hidden``: ``fn(x [B, N, C]) -> replacement or None``
BlockFn = Callable[[torch.Tensor], Optional[torch.Tensor]]
#: ``attn_qkv``: ``fn(q, k, v)``, each [B, heads, N, head_dim] as the attention uses them (observation)
QKVFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
#: ``SiteModel._attention(layer, q, k, v, *, scale, mask=None, q_offset=0) -> [B, heads, q, head_dim]``
ExplicitAttention = Callable[..., torch.Tensor]

#: what a vision family implements (abstract in :class:`Backbone` and :class:`SiteModel`)
BACKBONE_MEMBERS = ("blocks", "num_heads", "dynamic_size", "_token_counts", "_run_model", "_mlp_out_proj",
                    "final_norm", "_parameter_roles", "_install_attention", "can_wrap", "from_spec")
#: what an LVLM family may override (defaults: a LLaVA-like model)
LVLM_MEMBERS = ("can_wrap", "patches_one_to_one", "splits_images", "generated_token_type", "image_grid", "span_grids", "overview_span",
                "view_box", "vision_tower",
                "tower_patches_are_image_tokens", "text_position_ids", "image_spans", "attention_groups", "placeholder", "processor_images", "pixel_counts",
                "tower_inputs",
                "scan_options", "load_model", "refuses", "mrope", "tower_is_backbone", "deepstack_layers",
                "deepstack_tower_blocks", "observe_deepstack", "inject_deepstack")
#: what a mitigation implements (``_install``) and may override
MITIGATION_MEMBERS = ("name", "settings_class", "target", "_install", "logits_processors", "refusal",
                      "unavailable", "calibration_settings", "nothing_edited_hint")

__all__ = [
    "BACKBONE_MEMBERS", "LVLM", "LVLM_MEMBERS", "MITIGATION_MEMBERS", "SITES", "AnyOf", "Backbone", "BlockFn", "Bool",
    "Branch", "image_branch", "readout_branch", "text_branch",
    "CheckedSettings", "Choice", "Closer", "DeepStackObserver", "ExplicitAttention", "Float", "HookSet", "Hooks", "ImageSpans", "Int", "Kind",
    "ListOf", "LogitFn", "Mitigation", "ModelSpecError", "PluginError", "ProbFn", "PromptLayout", "QKVFn", "RowsFn",
    "Run", "SiteFn", "SiteHandle", "SiteModel", "Text", "TimmBackbone", "TokenLayout", "VsinkError", "VsinkWarning",
    "additive_mask", "below_depth", "family", "known_sink_dims", "load_timm", "lvlm_family", "module_parameters",
    "fresh_rows", "named_lvlm", "named_spec", "register", "rows_from", "setting", "to_pair",
]
