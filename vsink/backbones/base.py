"""The backbone protocol: one uniform interface over timm, open_clip and Hugging Face models.

Everything that depends on a model family lives in one adapter file per family; the rest of
vsink sees only :class:`Backbone`, its :class:`~vsink.layout.TokenLayout` and its named sites.

Sites (``block_input``, ``block_output``, ``mlp_hidden``, ``attn_logits``, ``attn_probs``,
``attn_qkv``) are the substrate every model shares: see :mod:`vsink.backbones.sites`.
"""

from __future__ import annotations

import copy
import os
from abc import abstractmethod
from contextlib import contextmanager
from numbers import Integral
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..arguments import instance_arg
from ..errors import VsinkError
from ..options import MAX_REGISTERS, Int, Option
from ..layout import TokenLayout
from ..viewbox import ViewBox
from .block_parts import BlockParts
from .hooks import hook_tensor
from .sites import SiteHandle, SiteModel

PARAMETER_ROLES = ("registers", "cls_token", "pos_embed", "patch_embed")


def backbone_arg(value: Any, name: str = "backbone") -> "Backbone":
    """``value`` if it is a :class:`Backbone`, else one error naming ``name`` and, for a spec
    string or a bare module, what to call instead (:func:`vsink.arguments.instance_arg`)."""
    if isinstance(value, (str, os.PathLike)):
        fix = f"load it first, vsink.load({str(value)!r})"
    elif isinstance(value, nn.Module):
        fix = "wrap it first, vsink.wrap(model)"
    else:
        fix = ""
    return instance_arg(value, Backbone, name, "a vsink Backbone (from vsink.load or vsink.wrap)", fix)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block; each module's own ``training`` flag restored after
    (also on an exception), a model partly in train mode included."""
    modes = [(m, m.training) for m in model.modules()]
    if not any(training for _, training in modes):
        yield
        return
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training

#: receives an attention-pooling head's probabilities [B, H, 1, N] (its probe over the output tokens)
PoolFn = Callable[[torch.Tensor], None]


def module_parameters(x: Optional[Union[nn.Module, nn.Parameter]]) -> list[nn.Parameter]:
    """A parameter, or every parameter of a module, as a list (empty for None)."""
    if x is None:
        return []
    return [x] if isinstance(x, nn.Parameter) else list(x.parameters())


def to_pair(v: Any) -> tuple[int, int]:
    """``n`` or ``(h, w)`` → ``(h, w)`` (image and patch sizes as the libraries store them)."""
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class Backbone(SiteModel):
    """A vision transformer behind vsink's uniform interface (its blocks' sites: :class:`SiteModel`).

    Attributes:
        model: the wrapped library module (``eval()`` mode).
        spec: the model spec string it was loaded from (or a description).
        family: ``"timm"``, ``"open_clip"`` or ``"hf"``.
        mean, std: per-channel normalisation of the model's preprocessing.
        img_size: default input size ``(H, W)``.
        patch_size: ``(ph, pw)``.
        attention_chunk_size: queries per block in explicit attention (None: automatic).
    """

    family: str = "?"
    #: what ``vsink models`` prints for this family (see :mod:`vsink.backbones.families`)
    spec_forms: ClassVar[str] = ""
    #: the specs a saved model of this family is rebuilt from (a full-match regular expression)
    saved_spec: ClassVar[str] = r"(?!)"
    saved_spec_help: ClassVar[str] = "nothing (this family saves no models)"
    #: the family builds a ViT with registers from scratch (the scratch recipe), passing their
    #: number as the library constructor's :attr:`register_kwarg`
    scratch_registers: ClassVar[bool] = False
    register_kwarg: ClassVar[Optional[str]] = None

    # --- how the family is found (vsink.backbones.families) ---------------------------------
    @classmethod
    def can_wrap(cls, model: nn.Module) -> bool:
        """Whether this family wraps an already-built ``model`` (:func:`vsink.wrap`)."""
        return False

    @classmethod
    def claims_directory(cls, path: Path) -> bool:
        """Whether a local directory (not a saved vsink model) is a model of this family."""
        return False

    @classmethod
    def from_spec(cls, name: str, *, weights: Optional[Union[str, os.PathLike]], img_size: Optional[int],
                  pretrained: bool, attn_implementation: Optional[str], model_kwargs: dict[str, Any]) -> "Backbone":
        """The backbone of the spec ``<family>:name`` (weights, device and dtype are applied after)."""
        raise VsinkError(f"the {cls.family} family loads no spec")

    @classmethod
    def from_saved(cls, directory: Path, cfg: dict[str, Any], *,
                   attn_implementation: Optional[str]) -> Optional["Backbone"]:
        """Rebuild a saved model's architecture (its weights are loaded after), or None: then it is
        rebuilt from the library spec recorded in ``vsink.json``."""
        return None

    def __init__(
        self,
        model: nn.Module,
        spec: str,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        img_size: tuple[int, int],
        patch_size: tuple[int, int],
    ):
        super().__init__(model, spec)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.patch_size = (int(patch_size[0]), int(patch_size[1]))
        self._appended = 0
        self._input_size = self.img_size
        #: how :func:`vsink.load` built this backbone (spec, img_size, model_kwargs), for saving
        self.source: dict[str, Any] = {}
        self._hooked_registers = 0

    # --- structure the adapters provide ------------------------------------------------
    @property
    @abstractmethod
    def dynamic_size(self) -> bool:
        """Whether inputs other than :attr:`img_size` are accepted."""

    @abstractmethod
    def _token_counts(self) -> tuple[int, int]:
        """(class tokens, registers after the class token)."""

    @abstractmethod
    def _run_model(self, pixel_values: torch.Tensor) -> Any:
        """Call the library model the way its users do; return its native output."""

    @property
    @abstractmethod
    def final_norm(self) -> nn.Module:
        """The normalisation the model applies to its output tokens (``nn.Identity`` if none)."""

    # --- derived ------------------------------------------------------------------------
    def layout(self, input_size: Optional[tuple[int, int]] = None) -> TokenLayout:
        """Token layout for an input of ``input_size`` (default :attr:`img_size`)."""
        size = self.check_input_size(input_size or self.img_size)
        n_cls, n_reg = self._token_counts()
        n_reg += self._hooked_registers
        grid = (size[0] // self.patch_size[0], size[1] // self.patch_size[1])
        return TokenLayout(num_cls=n_cls, num_registers=n_reg, grid=grid, num_appended=self._appended)

    def append_tokens(self, n: int) -> SiteHandle:
        """Append ``n`` zero tokens at the end of the sequence entering the first block (after
        the position embedding, so they get none). The layout reports them as appended registers
        until ``remove()``; every later site sees them."""
        if n < 1:
            raise VsinkError(f"append at least one token, got {n}")

        def pre_hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            x_bnc = self._to_bnc(x)
            extra = x_bnc.new_zeros(x_bnc.shape[0], n, x_bnc.shape[-1])
            grown = self._to_bnc(torch.cat([x_bnc, extra], dim=1))
            if args:
                return (grown, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": grown}

        handle = self.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
        self._appended += n

        def remove() -> None:
            handle.remove()
            self._appended -= n

        return SiteHandle(remove)

    # --- the attention-pooling head ---------------------------------------------------------
    @property
    def pool_head(self) -> Optional[nn.Module]:
        """The attention-pooling head whose probe (a learned query) attends over the output tokens
        after the final norm (SigLIP, SigLIP2, AIMv2), or None (the default: no such head)."""
        return None

    def hook_pool(self, fn: PoolFn) -> SiteHandle:
        """Call ``fn(probs)`` with the pooling head's attention, [B, H, 1, N] over the output
        tokens (laid out as :meth:`pool_layout`), on every forward; observation only (the head
        runs its own code). Models without an attention-pooling head: a :class:`VsinkError`."""
        head = self.pool_head
        if head is None:
            raise VsinkError(f"{self.spec} has no attention-pooling head (a learned probe attending over the tokens)")

        def observe(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self.suspended:
                with torch.no_grad():
                    fn(self._pool_probs(module, args, kwargs))

        return SiteHandle(head.register_forward_pre_hook(observe, with_kwargs=True).remove)

    def pool_layout(self, input_size: Optional[tuple[int, int]] = None) -> TokenLayout:
        """The layout of the tokens the pooling head attends over: :meth:`layout` without hooked
        registers (they are dropped before the final norm, so the head never sees them)."""
        layout = self.layout(input_size)
        return TokenLayout(layout.num_cls, layout.num_registers - self._hooked_registers, layout.grid,
                           layout.num_appended)

    def _pool_probs(self, head: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        """The head's probabilities [B, H, 1, N] from the inputs of its ``forward`` (adapters
        whose :attr:`pool_head` is not None implement it)."""
        raise VsinkError(f"{self.spec}: no pooling attention")

    # --- block weights ---------------------------------------------------------------------
    def block_parts(self, layer: int) -> BlockParts:
        """Block ``layer``'s weights as the weight-only defect direction reads them
        (:class:`~vsink.backbones.block_parts.BlockParts`); families that cannot give them refuse
        with one line (the default)."""
        raise VsinkError(f"{self.spec}: the {self.family} family does not give its block weights, so it has no "
                         "weight-only defect direction")

    # --- registers ----------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        """Width of the residual stream."""
        return int(self._mlp_out_proj(0).out_features)

    def parameter_roles(self) -> dict[str, list[nn.Parameter]]:
        """The model's token-embedding parameters by role (:data:`PARAMETER_ROLES`: registers,
        class token, position embedding, patch embedding), found by each adapter. Fine-tuning
        uses them to choose what to unlock and what gets no weight decay."""
        roles = self._parameter_roles()
        hooked = getattr(self.model, "vsink_registers", None)
        if hooked is not None:
            roles["registers"] = [*roles.get("registers", []), hooked]
        return {r: [p for p in roles.get(r, []) if p is not None] for r in PARAMETER_ROLES}

    @abstractmethod
    def _parameter_roles(self) -> dict[str, list[Optional[nn.Parameter]]]:
        """The adapter's part of :meth:`parameter_roles` (hooked registers are added by the base)."""

    @property
    def register_parameter_names(self) -> list[str]:
        """Names (in ``model.named_parameters()``) of the register tokens, if any."""
        ids = {id(p) for p in self.parameter_roles()["registers"]}
        return [n for n, p in self.model.named_parameters() if id(p) in ids]

    def with_registers(self, n: int, *, init_std: float = 1e-6, seed: int = 0) -> "Backbone":
        """A copy of this backbone with ``n`` learnable register tokens after the class token(s),
        initialised ~N(0, ``init_std``²), getting no position embedding, dropped at the output.

        timm and DINOv2 (HF) get their native registers (the same architecture with registers,
        weights carried over); other families get them through hooks around the blocks, stored
        as the parameter ``vsink_registers`` of the model. The original is left untouched. ``n`` is
        an integer in [1, 1024] (:data:`vsink.options.MAX_REGISTERS`, the command line's cap too;
        NumPy integers too).
        """
        n = int(n) if isinstance(n, Integral) and not isinstance(n, bool) else n
        n = Option("n", Int(1, MAX_REGISTERS)).check(n, name="n (registers)")
        if self.edits or self._attn_fns or self._appended:
            raise VsinkError(f"{self.spec}: remove edits and site functions before adding registers")
        g = torch.Generator().manual_seed(seed)
        tokens = (torch.randn(1, n, self.embed_dim, generator=g) * init_std).to(self.device, self.dtype)
        new = self._with_native_registers(tokens)
        if new is None:
            if self._hooked_registers:
                raise VsinkError(f"{self.spec} already has hooked registers")
            new = copy.deepcopy(self)
            new.attach_hooked_registers(nn.Parameter(tokens))
        new.source = {**self.source, "registers": new.layout().num_registers}
        new.synthetic = self.synthetic
        return new

    def _with_native_registers(self, tokens: torch.Tensor) -> Optional["Backbone"]:
        """Adapters with native registers return a new backbone; the default is hooks (None)."""
        return None

    def _register_points(self) -> tuple[nn.Module, str, nn.Module, str]:
        """(module, "pre"|"post") where registers are inserted after the class tokens (sequence
        [B, N, D]) and (module, "pre"|"post") where they are dropped again (before the final
        norm / pooling). Adapters using hooked registers implement this."""
        raise VsinkError(f"{self.spec}: registers are not supported for this family")

    def attach_hooked_registers(self, tokens: nn.Parameter) -> None:
        """Install ``tokens`` [1, n, D] as hooked registers of this backbone's model (used by
        :meth:`with_registers` and when loading a saved model)."""
        n_cls, n_reg = self._token_counts()
        if n_reg:
            raise VsinkError(f"{self.spec} has native registers; add more with its own architecture")
        n = tokens.shape[1]
        self.model.vsink_registers = tokens
        insert_at, insert_when, drop_at, drop_when = self._register_points()

        def insert(x: torch.Tensor) -> torch.Tensor:
            reg = self.model.vsink_registers.to(x.dtype).expand(x.shape[0], -1, -1)
            return torch.cat([x[:, :n_cls], reg, x[:, n_cls:]], dim=1)

        def drop(x: torch.Tensor) -> torch.Tensor:
            x = self._to_bnc(x)
            return self._to_bnc(torch.cat([x[:, :n_cls], x[:, n_cls + n:]], dim=1))

        hook_tensor(insert_at, insert_when, insert)
        hook_tensor(drop_at, drop_when, drop)
        self._hooked_registers = n

    # --- weights and saving ----------------------------------------------------------------
    def load_weights(self, path: Union[str, os.PathLike]) -> None:
        """Load a checkpoint (safetensors, or a state dict read with ``weights_only=True``) into
        :attr:`model`; missing keys, wrong shapes and NaN or infinite values are errors."""
        from ..finite import check_finite_weights
        from .weights import load_weights, read_state_dict

        load_weights(self.model, path, self._state_for_model(read_state_dict(path)))
        check_finite_weights(self, f"weights file {path}")

    def _state_for_model(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a checkpoint's keys onto :attr:`model` (adapters whose checkpoints hold more)."""
        return state


    def save(self, directory: Union[str, os.PathLike]) -> Path:
        """Save the weights (the library's own format, see the adapters) and ``vsink.json``, from
        which :func:`vsink.load` rebuilds this backbone (registers included). Files are written
        atomically; returns the directory."""
        from ..attention_variants import attention_variant
        from ..io import write_json

        if self.edits or self._appended:
            raise VsinkError(f"{self.spec}: remove forward edits ({', '.join(self.edits)}) before saving")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"format": "vsink-backbone", "version": 1, "family": self.family,
                "spec": self.source.get("spec", self.spec), "img_size": list(self.img_size),
                "model_kwargs": dict(self.source.get("model_kwargs") or {}), "mean": list(self.mean),
                "std": list(self.std), "hooked_registers": self._hooked_registers,
                "attention": attention_variant(self.model)}
        meta.update(self._save_weights(directory, meta))
        write_json(directory / "vsink.json", meta)
        return directory

    def _save_weights(self, directory: Path, meta: dict[str, Any]) -> dict[str, Any]:
        """Write ``model.safetensors`` (the model's state dict); return changes to ``vsink.json``."""
        from ..io import atomic_path
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        with atomic_path(directory / "model.safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        return {}

    def check_input_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """Raise a clear error if the model cannot take an input of this size."""
        h, w = int(size[0]), int(size[1])
        ph, pw = self.patch_size
        if h < ph or w < pw:
            raise VsinkError(f"image size {h}x{w} is smaller than the patch size {ph}x{pw} of {self.spec}")
        if h % ph or w % pw:
            raise VsinkError(f"image size {h}x{w} is not a multiple of the patch size {ph}x{pw} of {self.spec}")
        if (h, w) != self.img_size and not self.dynamic_size:
            raise VsinkError(
                f"{self.spec} takes only {self.img_size[0]}x{self.img_size[1]} inputs, got {h}x{w}; "
                "load it with that img_size instead (e.g. --img-size)"
            )
        return h, w

    # --- inputs -------------------------------------------------------------------------
    def view_box(self, size: Sequence[int]) -> ViewBox:
        """The region of a ``(width, height)`` image that :meth:`preprocess` feeds to the model:
        the whole image (it is resized, not cropped), in the image's pixels (:mod:`vsink.viewbox`)."""
        return ViewBox.full(size)

    def preprocess(self, images: Sequence[Image.Image], size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """RGB PIL images → normalised [B, 3, H, W] on the model's device and dtype.

        Every image is resized (bicubic) to ``size`` (default :attr:`img_size`), so the whole
        image is seen and the patch grid is the same for the batch.
        """
        h, w = self.check_input_size(size or self.img_size)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        arrays = []
        for img in images:
            arr = np.asarray(img.convert("RGB").resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0
            arrays.append((arr - mean) / std)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return x.to(device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> Any:
        """The library model's own output for ``pixel_values`` (with any installed sites), in eval
        mode: a model left in train mode (dropout, stochastic depth active) is switched to eval for
        the call and every module's own mode is restored afterwards, so probes give the same
        answer on every run and the user's model is left as it was."""
        self._input_size = self.check_input_size(tuple(pixel_values.shape[-2:]))
        with evaluating(self.model):
            return self._run_model(pixel_values)

    def train_forward(self, pixel_values: torch.Tensor, module: Optional[nn.Module] = None) -> Any:
        """Forward with gradients, for training: calls ``module`` (default: the model; pass its
        DDP wrapper under ``torchrun``) the way its users do; installed sites see this input."""
        self._input_size = self.check_input_size(tuple(pixel_values.shape[-2:]))
        return self._call_module(module if module is not None else self.model, pixel_values)

    def _call_module(self, module: nn.Module, pixel_values: torch.Tensor) -> Any:
        return module(pixel_values)

    def current_layout(self) -> TokenLayout:
        """Layout of the input being processed by :meth:`forward` (for site functions)."""
        return self.layout(self._input_size)

    def describe(self) -> str:
        return (
            f"{self.spec} [{self.family}] {self.num_layers} blocks, {self.num_heads} heads, "
            f"input {self.img_size[0]}x{self.img_size[1]}, {self.layout().describe()}"
        )
