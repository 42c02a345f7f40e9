"""Weight-only defect directions (SINDER, Wang et al., ECCV 2024): the direction high-norm tokens
would take if every block were linear, computed from the weights alone, without images.

Per block (the reference's ``singular_defect.py``, haoqiwang/sinder @ 3b5cd45; docs/defect.md):

* attention path ``A = I + diag(ls1)·proj·N_inner·V·N1``, where ``V`` holds every head's value
  rows and ``N1 = diag(norm1.w)·(I − 11ᵀ/D)`` is a LayerNorm's linear part (scale and centring;
  ``diag(w)`` for an RMSNorm, no centring). The attention weights are left out: each output is a
  convex combination of the values, so the path is linear in the tokens up to that mixing;
* MLP path ``C = I + diag(ls2)·W_out·H·N2``, where ``H`` [hidden, D] is the least-squares fit of
  the MLP's nonlinear part (its input to the input of its output projection) on Gaussian inputs
  ``X ~ N(0, I)`` without intercept (``H = argmin ‖X Hᵀ − hidden(X)‖``, solved from the normal
  equations accumulated over chunks, float64);
* block map ``C·A``; the cumulative map after block ``l`` is ``M_l = C_l A_l ··· C_0 A_0`` and its
  top left singular vector is the defect direction at that depth (sign: largest entry positive).

It costs one MLP forward of ``samples`` Gaussian inputs per block (the reference's 100,000 by
default), so it is opt-in (``vsink defect``, ``vsink scan --defect``) and cached on disk by
:func:`vsink.manifest.weights_fingerprint`, the sample count and the seed (:func:`cache_dir`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones.base import Backbone
from .backbones.block_parts import BlockParts, norm_matrix
from .errors import VsinkError
from .manifest import weights_fingerprint
from .options import SEED, Bool, Int, Option, declare
from .version import __version__

#: the reference's sample count per block (``anomaly_dir_mlp_ls``: 100000)
DEFAULT_SAMPLES = 100_000
#: Gaussian samples drawn and fitted per step (memory: CHUNK × (D + hidden) float64 values)
CHUNK = 8192
#: |cos| at or above which the weight-only and the observed direction are said to agree
AGREE = 0.9

DEFECT = declare(
    Option("samples", Int(16, 10_000_000), DEFAULT_SAMPLES, "Gaussian samples per block for the MLP's "
           "least-squares linearisation"),
    Option("seed", SEED, 0, "seed of the Gaussian samples"),
    Option("recompute", Bool(), False, "ignore the cached directions and recompute them (then cache them again)"),
)


def cache_dir() -> Path:
    """Where directions are cached: ``$VSINK_CACHE_DIR``, else ``$XDG_CACHE_HOME/vsink``, else
    ``~/.cache/vsink``; each result is ``defect/<fingerprint>-n<samples>-s<seed>.npz``."""
    root = os.environ.get("VSINK_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vsink"


def block_seed(seed: int, layer: int) -> int:
    """The generator seed of block ``layer``'s Gaussian samples."""
    return seed * 1_000_003 + layer


def gaussian_chunks(dim: int, samples: int, seed: int, layer: int) -> Iterator[torch.Tensor]:
    """Block ``layer``'s Gaussian samples N(0, I) [samples, dim], float64, as chunks of at most
    :data:`CHUNK` rows drawn in turn from one generator seeded with :func:`block_seed`."""
    g = torch.Generator().manual_seed(block_seed(seed, layer))
    for start in range(0, samples, CHUNK):
        yield torch.randn(min(CHUNK, samples - start), dim, generator=g, dtype=torch.float64)


def gaussian_samples(dim: int, samples: int, seed: int, layer: int) -> torch.Tensor:
    """All of block ``layer``'s samples at once (the chunks of :func:`gaussian_chunks`, stacked)."""
    return torch.cat(list(gaussian_chunks(dim, samples, seed, layer)))


def _f64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to("cpu", torch.float64)


def _scaled(ls: Optional[torch.Tensor], m: torch.Tensor) -> torch.Tensor:
    return m if ls is None else _f64(ls)[:, None] * m


def attention_map(parts: BlockParts, dim: int, where: str = "block") -> torch.Tensor:
    """``I + diag(ls1)·proj·N_inner·V·N1`` [dim, dim], float64."""
    value, proj = _f64(parts.value), _f64(parts.proj)
    if value.shape[1] != dim or proj.shape != (dim, value.shape[0]):
        raise VsinkError(f"{where}: value {tuple(value.shape)} and output projection {tuple(proj.shape)} do not "
                         f"fit width {dim}")
    inner = norm_matrix(parts.inner_norm, value.shape[0], f"{where} attention norm")
    path = proj @ inner @ value @ norm_matrix(parts.norm1, dim, f"{where} norm1")
    return torch.eye(dim, dtype=torch.float64) + _scaled(parts.ls1, path)


def mlp_fit(parts: BlockParts, dim: int, samples: int, seed: int, layer: int,
            bar: Optional[tqdm] = None) -> torch.Tensor:
    """The least-squares linear map [hidden, dim] of the MLP's nonlinear part on block ``layer``'s
    Gaussian samples (no intercept), from the normal equations ``(XᵀX) Hᵀ = XᵀY``."""
    hidden = parts.hidden64()
    xtx = torch.zeros(dim, dim, dtype=torch.float64)
    xty: Optional[torch.Tensor] = None
    with torch.no_grad():
        for x in gaussian_chunks(dim, samples, seed, layer):
            y = hidden(x)
            xtx += x.T @ x
            xty = x.T @ y if xty is None else xty + x.T @ y
            if bar is not None:
                bar.update(1)
    return torch.linalg.solve(xtx, xty).T


def mlp_map(parts: BlockParts, dim: int, samples: int, seed: int, layer: int,
            bar: Optional[tqdm] = None, where: str = "block") -> torch.Tensor:
    """``I + diag(ls2)·W_out·H·N2`` [dim, dim], float64 (``H``: :func:`mlp_fit`)."""
    fit = mlp_fit(parts, dim, samples, seed, layer, bar)
    out = _f64(parts.out)
    if out.shape != (dim, fit.shape[0]):
        raise VsinkError(f"{where}: MLP output projection {tuple(out.shape)} does not fit hidden width {fit.shape[0]}")
    path = out @ fit @ norm_matrix(parts.norm2, dim, f"{where} norm2")
    return torch.eye(dim, dtype=torch.float64) + _scaled(parts.ls2, path)


def top_direction(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The top left singular vector of ``m`` (sign: its largest-magnitude entry positive) and all
    singular values, largest first."""
    u, s, _ = torch.linalg.svd(m)
    v = u[:, 0]
    if v[v.abs().argmax()] < 0:
        v = -v
    return v, s


@dataclass
class DefectResult:
    """Weight-only defect directions of a model, one per block (after that block)."""

    model: str
    weights: str
    samples: int
    seed: int
    #: [blocks, D] unit vectors, float64
    directions: np.ndarray
    #: [blocks]: the cumulative map's top singular value
    singular_values: np.ndarray
    #: [blocks]: its top singular value over the second (how dominant the direction is)
    dominance: np.ndarray
    cached: bool = False

    def to_json(self) -> dict[str, Any]:
        blocks = []
        for i, (u, s, d) in enumerate(zip(self.directions, self.singular_values, self.dominance)):
            top = np.argsort(-np.abs(u), kind="stable")[:5]
            blocks.append({"index": i, "singular_value": float(s), "dominance": float(d),
                           "top_dims": [{"dim": int(k), "value": float(u[k])} for k in top]})
        return {"vsink_version": __version__, "model": self.model, "weights": self.weights,
                "samples": self.samples, "seed": self.seed, "blocks": blocks}

    def save(self, out_dir: Union[str, os.PathLike]) -> dict[str, Path]:
        """Write ``defect.json`` (per block: singular value, dominance, largest entries) and
        ``defect.npz`` (``directions`` [blocks, D], ``singular_values``, ``dominance``) as one set
        with its ``vsink-run.json``."""
        from .io import write_text
        from .outputs import OutputSet

        determining = {"model": self.model, "weights": self.weights, "samples": self.samples, "seed": self.seed,
                       "vsink_version": __version__}
        with OutputSet(out_dir, "vsink defect", {"determining": determining}) as stage:
            _write_npz(stage / "defect.npz", self)
            write_text(stage / "defect.json", json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n")
        out = Path(out_dir)
        return {"json": out / "defect.json", "arrays": out / "defect.npz", "record": out / "vsink-run.json"}


def _write_npz(path: Path, result: DefectResult) -> None:
    from .io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, directions=result.directions, singular_values=result.singular_values,
                     dominance=result.dominance)


def _cache_path(fingerprint: str, samples: int, seed: int) -> Path:
    return cache_dir() / "defect" / f"{fingerprint.removeprefix('sha256:')}-n{samples}-s{seed}.npz"


def _read_cache(path: Path, blocks: int, dim: int) -> Optional[dict[str, np.ndarray]]:
    """The cached arrays, or None when the file is missing, unreadable or of other shapes."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k], dtype=np.float64) for k in ("directions", "singular_values", "dominance")}
    except (OSError, KeyError, ValueError):
        return None
    if arrays["directions"].shape != (blocks, dim) or arrays["singular_values"].shape != (blocks,) \
            or arrays["dominance"].shape != (blocks,) or not all(np.isfinite(a).all() for a in arrays.values()):
        return None
    return arrays


def defect_directions(backbone: Backbone, *, samples: int = DEFAULT_SAMPLES, seed: int = 0,
                      recompute: bool = False, cache: bool = True, progress: bool = True) -> DefectResult:
    """The weight-only defect direction after every block of ``backbone`` (module docstring).

    Args:
        backbone: any vision backbone whose family gives its block weights
            (:meth:`~vsink.backbones.base.Backbone.block_parts`; others refuse with one line).
        samples: Gaussian samples per block for the MLP fit (the reference's 100,000 by default).
        seed: seed of the samples (block ``l`` draws from :func:`block_seed`).
        recompute: ignore a cached result (the new one is cached).
        cache: read and write the cache (:func:`cache_dir`).
        progress: show a progress bar.
    """
    DEFECT["samples"].check(samples)
    DEFECT["seed"].check(seed)
    dim, blocks = backbone.embed_dim, backbone.num_layers
    if samples <= dim:
        raise VsinkError(f"samples {samples} must exceed the width {dim} of {backbone.spec} (the least-squares fit of "
                         f"a {dim}-wide map needs more samples than unknowns per row; the reference uses 100000)")
    parts = [backbone.block_parts(i) for i in range(blocks)]  # a family that cannot refuses before any work
    fingerprint = weights_fingerprint(backbone.model)
    path = _cache_path(fingerprint, samples, seed)
    if cache and not recompute:
        arrays = _read_cache(path, blocks, dim)
        if arrays is not None:
            return DefectResult(backbone.spec, fingerprint, samples, seed, cached=True, **arrays)
    chunks = -(-samples // CHUNK)
    bar = tqdm(total=blocks * chunks, desc="defect", unit="chunk", disable=not progress)
    cumulative = torch.eye(dim, dtype=torch.float64)
    directions, values, dominance = [], [], []
    with backbone.suspend():  # installed site functions stay out of the fit
        for i, p in enumerate(parts):
            where = f"{backbone.spec} block {i}"
            block = mlp_map(p, dim, samples, seed, i, bar, where) @ attention_map(p, dim, where)
            cumulative = block @ cumulative
            v, s = top_direction(cumulative)
            directions.append(v.numpy())
            values.append(float(s[0]))
            dominance.append(float(s[0] / s[1]) if len(s) > 1 and s[1] > 0 else float("inf"))
    bar.close()
    result = DefectResult(backbone.spec, fingerprint, samples, seed, np.stack(directions),
                          np.asarray(values, dtype=np.float64), np.asarray(dominance, dtype=np.float64))
    if not all(np.isfinite(a).all() for a in (result.directions, result.singular_values, result.dominance)):
        raise VsinkError(f"{backbone.spec}: the linearised blocks overflow float64 (singular values "
                         f"{result.singular_values.tolist()}); no defect direction")
    if cache:
        _write_npz(path, result)
    return result


@dataclass
class DefectComparison:
    """The weight-only direction beside the observed high-norm direction, per block."""

    defect: DefectResult
    #: per block: the observed direction (unit mean of the high-norm tokens' unit residuals), or None
    observed: list[Optional[np.ndarray]]
    #: per block: how many high-norm tokens it was averaged over
    tokens: list[int]
    threshold: float = AGREE
    cosines: list[Optional[float]] = field(init=False)

    def __post_init__(self) -> None:
        self.cosines = [None if o is None else float(abs(np.dot(o, d)))
                        for o, d in zip(self.observed, self.defect.directions)]

    def verdict(self, layer: int) -> str:
        """``agrees`` (|cos| ≥ :attr:`threshold`), ``disagrees`` or ``no high-norm tokens``."""
        c = self.cosines[layer]
        if c is None:
            return "no high-norm tokens"
        return "agrees" if c >= self.threshold else "disagrees"

    @property
    def disagreeing(self) -> list[int]:
        """Blocks with high-norm tokens whose observed direction the weight-only one misses."""
        return [i for i in range(len(self.cosines)) if self.verdict(i) == "disagrees"]

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.defect.samples, "seed": self.defect.seed, "agree_at": self.threshold,
                "disagreeing_blocks": self.disagreeing,
                "blocks": [{"index": i, "abs_cos": c, "high_norm_tokens": n, "verdict": self.verdict(i),
                            "singular_value": float(self.defect.singular_values[i])}
                           for i, (c, n) in enumerate(zip(self.cosines, self.tokens))]}


def observed_directions(backbone: Backbone, images: Sequence[Any], masks: Sequence[np.ndarray], *,
                        size: tuple[int, int], batch_size: int = 8,
                        progress: bool = True) -> tuple[list[Optional[np.ndarray]], list[int]]:
    """Per block, the unit mean of the unit residual vectors (``block_output``) of the tokens flagged
    in ``masks[block]`` (bool [images, patches], images in the order ``images`` load; unreadable
    ones are skipped as the scan skipped them), and how many tokens that was."""
    from .images import load_batch

    dim, blocks = backbone.embed_dim, backbone.num_layers
    sums = [torch.zeros(dim, dtype=torch.float64) for _ in range(blocks)]
    counts = [0] * blocks
    offset = 0
    layout = backbone.layout(size)
    state = {"rows": slice(0, 0)}

    def observe(layer: int):
        def fn(x: torch.Tensor) -> None:
            mask = torch.as_tensor(masks[layer][state["rows"]], device=x.device)
            if mask.any():
                patches = x[:, layout.num_prefix:layout.num_prefix + layout.num_patches].to(torch.float64)
                picked = patches[mask].cpu()
                sums[layer] += (picked / picked.norm(dim=-1, keepdim=True).clamp_min(1e-30)).sum(0)
                counts[layer] += int(mask.sum())
            return None
        return fn

    bar = tqdm(total=len(images), desc="defect: observed", unit="img", disable=not progress)
    handles = [backbone.hook("block_output", i, observe(i)) for i in range(blocks)]
    try:
        for start in range(0, len(images), batch_size):
            batch, _, _ = load_batch(images[start:start + batch_size], start)
            if batch:
                state["rows"] = slice(offset, offset + len(batch))
                backbone.forward(backbone.preprocess(batch, size))
                offset += len(batch)
            bar.update(len(images[start:start + batch_size]))
    finally:
        for h in handles:
            h.remove()
        bar.close()
    observed: list[Optional[np.ndarray]] = []
    for s, n in zip(sums, counts):
        norm = float(s.norm())
        observed.append((s / norm).numpy() if n and norm > 0 else None)
    return observed, counts


def compare_with_scan(backbone: Backbone, images: Sequence[Any], result: Any, defect: DefectResult, *,
                      batch_size: int = 8, progress: bool = True) -> DefectComparison:
    """Put ``defect`` beside the high-norm tokens of a :class:`~vsink.scan.ScanResult` of the same
    images: a second pass collects their residual directions (:func:`observed_directions`)."""
    hn = result.high_norm
    masks = [hn.mask(i) if i in result.trace.layers else np.zeros((len(result.images), hn.layout.num_patches), bool)
             for i in range(backbone.num_layers)]
    observed, counts = observed_directions(backbone, images, masks, size=tuple(result.input_size),
                                           batch_size=batch_size, progress=progress)
    return DefectComparison(defect, observed, counts)
