"""Where each kind of token sits in a vision transformer's sequence.

Every slice of a token sequence in vsink goes through :class:`TokenLayout`; no other
module hard-codes ``x[:, 1:]`` or a patch count.

The sequence order is always::

    [class tokens (num_cls), registers (num_registers), patches (h*w, row-major), appended (num_appended)]

``num_registers`` are registers placed right after the class token (DINOv2, timm, HF);
``num_appended`` are registers appended at the end of the sequence (test-time registers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch

from .wording import count

Array = Union[torch.Tensor, np.ndarray]

TOKEN_KINDS = ("cls", "register", "patch")


@dataclass(frozen=True)
class TokenLayout:
    """Token positions of one image's sequence.

    Args:
        num_cls: class-like prefix tokens (class token, distillation token); 0 for SigLIP.
        num_registers: register tokens right after the class tokens.
        grid: patch grid ``(h, w)`` for the actual input size.
        num_appended: register tokens appended after the patches.
    """

    num_cls: int
    num_registers: int
    grid: tuple[int, int]
    num_appended: int = 0

    def __post_init__(self) -> None:
        if min(self.num_cls, self.num_registers, self.num_appended) < 0:
            raise ValueError(f"token counts must be >= 0, got {self}")
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"grid must be (h, w) with h, w >= 1, got {self.grid}")
        object.__setattr__(self, "grid", (int(self.grid[0]), int(self.grid[1])))

    # --- counts -------------------------------------------------------------------
    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_prefix(self) -> int:
        """Tokens before the patches (class tokens and leading registers)."""
        return self.num_cls + self.num_registers

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches + self.num_appended

    @property
    def total_registers(self) -> int:
        return self.num_registers + self.num_appended

    @property
    def register_position(self) -> str:
        """``"after_cls"``, ``"end"``, ``"after_cls+end"`` or ``"none"``."""
        parts = [name for name, n in (("after_cls", self.num_registers), ("end", self.num_appended)) if n]
        return "+".join(parts) if parts else "none"

    # --- index sets ---------------------------------------------------------------
    @property
    def cls_token(self) -> Optional[int]:
        """Index of the (first) class token, whose attention row is the ``cls`` map; None without one."""
        return 0 if self.num_cls else None

    @property
    def cls_slice(self) -> slice:
        return slice(0, self.num_cls)

    @property
    def patch_slice(self) -> slice:
        return slice(self.num_prefix, self.num_prefix + self.num_patches)

    def register_indices(self) -> list[int]:
        return [*range(self.num_cls, self.num_prefix), *self.appended_indices()]

    def appended_indices(self) -> list[int]:
        """Registers appended after the patches (test-time registers)."""
        return list(range(self.num_prefix + self.num_patches, self.num_tokens))

    def cls_indices(self) -> list[int]:
        return list(range(self.num_cls))

    def non_patch_indices(self) -> list[int]:
        """Class tokens then registers, in sequence order."""
        return self.cls_indices() + self.register_indices()

    # --- per-token queries ------------------------------------------------------------
    def kind_of(self, token: int) -> str:
        """``"cls"``, ``"register"`` or ``"patch"`` for a token index."""
        if not 0 <= token < self.num_tokens:
            raise IndexError(f"token {token} outside a sequence of {self.num_tokens}")
        if token < self.num_cls:
            return "cls"
        if token < self.num_prefix or token >= self.num_prefix + self.num_patches:
            return "register"
        return "patch"

    def kinds(self) -> list[str]:
        return [self.kind_of(t) for t in range(self.num_tokens)]

    def patch_position(self, token: int) -> tuple[int, int]:
        """(row, col) of a patch token on the grid."""
        if self.kind_of(token) != "patch":
            raise ValueError(f"token {token} is a {self.kind_of(token)} token, not a patch")
        return divmod(token - self.num_prefix, self.grid[1])

    def patch_token(self, row: int, col: int) -> int:
        """Sequence index of the patch at (row, col)."""
        h, w = self.grid
        if not (0 <= row < h and 0 <= col < w):
            raise IndexError(f"patch ({row}, {col}) outside grid {self.grid}")
        return self.num_prefix + row * w + col

    # --- slicing tensors / arrays ---------------------------------------------------------
    def _check(self, x: Array, dim: int) -> int:
        dim = dim % x.ndim
        if x.shape[dim] != self.num_tokens:
            raise ValueError(
                f"tensor has {x.shape[dim]} tokens on dim {dim}, layout expects {self.num_tokens} "
                f"({self.describe()})"
            )
        return dim

    @staticmethod
    def _index(x: Array, dim: int, index: Any) -> Array:
        return x[(slice(None),) * dim + (index,)]

    def patches(self, x: Array, dim: int = 1) -> Array:
        """The patch tokens of ``x`` (torch tensor or numpy array) along ``dim`` (a view)."""
        dim = self._check(x, dim)
        return self._index(x, dim, self.patch_slice)

    def patch_grid(self, x: Array, dim: int = 1) -> Array:
        """Patch tokens reshaped so that ``dim`` becomes two dims ``(h, w)``."""
        dim = self._check(x, dim)
        p = self.patches(x, dim)
        return p.reshape(*p.shape[:dim], *self.grid, *p.shape[dim + 1:])

    def split(self, x: Array, dim: int = 1) -> dict[str, Array]:
        """``{"cls", "registers", "patches"}`` parts of ``x`` along ``dim``.

        ``registers`` holds leading then appended registers, in sequence order.
        """
        dim = self._check(x, dim)
        return {
            "cls": self._index(x, dim, self.cls_slice),
            "registers": self._index(x, dim, self.register_indices()),
            "patches": self.patches(x, dim),
        }

    # --- structure ----------------------------------------------------------------------
    def with_appended(self, n: int) -> "TokenLayout":
        return TokenLayout(self.num_cls, self.num_registers, self.grid, self.num_appended + n)

    def describe(self) -> str:
        return (
            f"{self.num_cls} cls + {count(self.num_registers, 'register')} + {self.grid[0]}x{self.grid[1]} patches"
            + (f" + {count(self.num_appended, 'appended register')}" if self.num_appended else "")
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "cls": self.num_cls,
            "registers": self.total_registers,
            "register_position": self.register_position,
            "registers_after_cls": self.num_registers,
            "registers_appended": self.num_appended,
            "grid": list(self.grid),
            "tokens": self.num_tokens,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenLayout":
        if d.get("kind") == "prompt":
            return PromptLayout(num_cls=int(d["text_before"]), num_registers=0, grid=tuple(d["grid"]),
                                num_appended=int(d["text_after"]), bos=bool(d.get("bos", True)))
        return cls(
            num_cls=int(d["cls"]),
            num_registers=int(d.get("registers_after_cls", d["registers"])),
            grid=tuple(d["grid"]),
            num_appended=int(d.get("registers_appended", 0)),
        )


@dataclass(frozen=True)
class PromptLayout(TokenLayout):
    """One LVLM prompt row as a token layout: ``[BOS, text before the image (system, user
    prefix), the image tokens (a grid), text after the image (the question, the assistant
    prefix)]``.

    It is a :class:`TokenLayout` whose "patches" are the image tokens (``num_cls`` counts the text
    before the image, ``num_appended`` the text after it; no registers), so probes, traces and the
    detectors work on a decoder unchanged. Token kinds are ``"bos"``, ``"text"`` and ``"image"``;
    the ``attn_cls`` row of a trace is the attention of the *last* prompt token, the query that
    produces the answer (a causal model's first token attends only to itself).
    """

    bos: bool = True

    @classmethod
    def of_row(cls, spans: "ImageSpans", row: int, *, bos: bool = True) -> "PromptLayout":
        """The layout of one row with one contiguous image run (grid: 1 x count unless given)."""
        runs = spans.spans[row]
        if len(runs) != 1:
            raise ValueError(f"row {row} has {len(runs)} image runs; a prompt layout needs exactly one")
        start, end = runs[0]
        return cls(num_cls=start, num_registers=0, grid=(1, end - start), num_appended=spans.length - end, bos=bos)

    def with_grid(self, grid: tuple[int, int]) -> "PromptLayout":
        if grid[0] * grid[1] != self.num_patches:
            raise ValueError(f"grid {grid} does not hold {self.num_patches} image tokens")
        return PromptLayout(self.num_cls, 0, grid, self.num_appended, bos=self.bos)

    @property
    def cls_token(self) -> Optional[int]:
        return self.num_tokens - 1

    def cls_indices(self) -> list[int]:
        return []

    def register_indices(self) -> list[int]:
        return []

    def kind_of(self, token: int) -> str:
        if not 0 <= token < self.num_tokens:
            raise IndexError(f"token {token} outside a sequence of {self.num_tokens}")
        if token == 0 and self.bos:
            return "bos"
        return "image" if self.patch_slice.start <= token < self.patch_slice.stop else "text"

    def patch_position(self, token: int) -> tuple[int, int]:
        if self.kind_of(token) != "image":
            raise ValueError(f"token {token} is a {self.kind_of(token)} token, not an image token")
        return divmod(token - self.num_prefix, self.grid[1])

    def describe(self) -> str:
        before = self.num_cls - int(self.bos)
        return (("BOS + " if self.bos else "") + f"{before} text + {self.grid[0]}x{self.grid[1]} image "
                f"+ {self.num_appended} text")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "prompt", "bos": self.bos, "text_before": self.num_cls, "grid": list(self.grid),
                "text_after": self.num_appended, "image_tokens": self.num_patches, "tokens": self.num_tokens}


@dataclass(frozen=True)
class ImageSpans:
    """Where the image tokens of each batch row of an LVLM prompt sit (rows differ under left
    padding). ``spans[b]`` lists ``(start, end)`` (end exclusive) runs of image tokens in row b;
    ``length`` is the prompt length. Every image-token slicing of the LVLM code goes through it."""

    spans: tuple[tuple[tuple[int, int], ...], ...]
    length: int

    @classmethod
    def from_ids(cls, input_ids: Any, image_token_id: int) -> "ImageSpans":
        """Runs of ``image_token_id`` in each row of ``input_ids`` [B, N]."""
        is_img = (torch.as_tensor(input_ids) == image_token_id).cpu()
        rows = []
        for row in is_img:
            padded = torch.cat([torch.zeros(1, dtype=torch.int8), row.to(torch.int8), torch.zeros(1, dtype=torch.int8)])
            edges = torch.diff(padded).nonzero().flatten().tolist()
            rows.append(tuple((edges[i], edges[i + 1]) for i in range(0, len(edges), 2)))
        return cls(tuple(rows), int(is_img.shape[1]))

    @property
    def batch_size(self) -> int:
        return len(self.spans)

    def counts(self) -> list[int]:
        """Image tokens per row."""
        return [sum(e - s for s, e in row) for row in self.spans]

    def mask(self, total: Optional[int] = None, device: Any = None) -> Any:
        """Boolean [B, total] (default: the prompt length): True on image tokens; positions past
        the prompt (generated tokens) are never image tokens."""
        m = torch.zeros(self.batch_size, max(total or self.length, self.length), dtype=torch.bool, device=device)
        for b, row in enumerate(self.spans):
            for s, e in row:
                m[b, s:e] = True
        return m

    def positions(self, row: int) -> list[int]:
        """Positions of row ``row``'s image tokens, in order."""
        return [p for s, e in self.spans[row] for p in range(s, e)]

    def end(self, row: int) -> int:
        """One past the last image token of a row (0 if it has none)."""
        return max((e for _, e in self.spans[row]), default=0)
