"""Run manifests: every output folder records what determined its results, in ``vsink-run.json``
(written by :class:`vsink.outputs.OutputSet` for the sets, by :func:`write_record` for the
resumable runners' folders)::

    {"command": "vsink eval pope", "vsink_version": "...", "written": "...",
     "determining": {"model": ..., "weights": ..., "mitigation": ..., ...}, "files": [...]}

A resumed run compares its own ``determining`` fields with the folder's (:func:`check_resume`)
and is refused with one line naming each field that differs (``field: old → new``); nothing is
reused across a difference. The weights are identified by :func:`weights_fingerprint`, input
files by their bytes (:func:`file_sha256`, :func:`files_fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from .outputs import MANIFEST, OutputError, read_manifest

PathLike = Union[str, os.PathLike]

#: values sampled from each tensor for :func:`weights_fingerprint`
SAMPLES = 64


class StaleRun(OutputError):
    """A folder holding a run made with other settings than the one asked to resume it."""


def content_hash(obj: Any) -> str:
    """SHA-256 of ``obj`` as canonical JSON (sorted keys), hex: the identity of a list of questions
    or images."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: PathLike) -> str:
    """``sha256:`` + hex of a file's bytes (read in blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def files_fingerprint(directory: PathLike, names: Any) -> str:
    """One identity of the files ``names`` in ``directory``: :func:`content_hash` of each distinct
    name with the SHA-256 of its bytes (None for a file that is missing, unreadable or outside the
    folder: a run skips it, and it counts as changed once it appears)."""
    from .readback import member
    from .readers import ReadError

    entries: dict[str, Optional[str]] = {}
    for name in sorted({str(n) for n in names}):
        try:
            path = member(directory, name, str(directory))
            entries[name] = file_sha256(path) if path.is_file() else None
        except (ReadError, OSError):
            entries[name] = None
    return content_hash(entries)


def weights_fingerprint(module: Any) -> str:
    """A cheap identity of a model's weights (``sha256:`` + hex): over every parameter and buffer,
    sorted by name, its name, dtype and shape, the float64 sum of its values and :data:`SAMPLES`
    values at evenly spaced positions. Any change of names or shapes, any change that moves a
    tensor's sum (fine-tuning, another checkpoint, other dtype) and any change at a sampled position
    changes it; reading it costs one pass of sums, no copy of the model. It is not a cryptographic
    identity of every value: a change that keeps every sum and misses every sample goes unseen."""
    import torch

    digest = hashlib.sha256()
    offloaded = _offloaded(module)
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict(keep_vars=False).items()):
            if tensor.is_meta and name in offloaded:
                tensor = offloaded[name]()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            if tensor.is_meta or tensor.numel() == 0:
                continue
            flat = tensor.detach().reshape(-1)
            if flat.is_floating_point() or flat.is_complex():
                total = flat.sum(dtype=torch.complex128 if flat.is_complex() else torch.float64)
            else:
                total = flat.sum(dtype=torch.int64)
            index = torch.linspace(0, flat.numel() - 1, min(SAMPLES, flat.numel()), device=flat.device).long()
            sample = flat[index].to("cpu")
            digest.update(repr(total.item()).encode())
            digest.update(sample.to(torch.float64 if sample.is_floating_point() else sample.dtype).numpy().tobytes()
                          if not sample.is_complex() else sample.numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def _offloaded(module: Any) -> dict[str, Callable[[], Any]]:
    """Readers of the weights accelerate offloaded (``device_map`` with ``cpu``/``disk`` entries:
    on the meta device in the module, the values in its hooks' ``weights_map``), by state-dict name."""
    readers: dict[str, Callable[[], Any]] = {}
    for prefix, sub in module.named_modules():
        hook = getattr(sub, "_hf_hook", None)
        weights = getattr(hook, "weights_map", None) if getattr(hook, "offload", False) else None
        if weights is None:
            continue
        for local in sub.state_dict(keep_vars=False):
            if local in weights:
                readers[f"{prefix}.{local}" if prefix else local] = lambda w=weights, k=local: w[k]
    return readers


def _shown(value: Any, limit: int = 60) -> str:
    """A value for a one-line message: hashes shortened, long values cut."""
    if isinstance(value, str) and re.fullmatch(r"(sha256:)?[0-9a-f]{64}", value):
        return value[:len(value) - 64 + 12] + "…"
    text = json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``field: old → new`` for every field of ``new`` whose value in ``old`` differs (a field
    ``old`` lacks shows as ``(not recorded)``), in ``new``'s order."""
    out = []
    for key, value in new.items():
        if key not in old:
            out.append(f"{key}: (not recorded) → {_shown(value)}")
        elif json.loads(json.dumps(old[key], default=str)) != json.loads(json.dumps(value, default=str)):
            out.append(f"{key}: {_shown(old[key])} → {_shown(value)}")
    return out


def recorded(directory: PathLike) -> Optional[dict[str, Any]]:
    """The ``determining`` fields a folder's manifest records (None without a manifest)."""
    manifest = read_manifest(directory)
    if manifest is None:
        return None
    fields = manifest.get("determining")
    if not isinstance(fields, dict):
        raise StaleRun(f"{Path(directory) / MANIFEST}: no 'determining' record; it was not written by this vsink")
    return fields


def check_resume(directory: PathLike, determining: Mapping[str, Any], what: str = "the earlier results",
                 remedy: str = "use another --out, or pass --new-run") -> None:
    """Refuse to reuse ``what`` in ``directory`` unless its manifest records the same
    ``determining`` fields; one line names every field that differs, or says the folder has no
    record (a run of an older vsink), and ends with ``remedy`` (what the command offers)."""
    old = recorded(directory)
    if old is None:
        raise StaleRun(f"{directory}: {what} have no record of what made them ({MANIFEST}; made by an older "
                       f"vsink?); they cannot be resumed: {remedy}")
    changed = differences(old, determining)
    if changed:
        raise StaleRun(f"{directory}: {what} were made with other settings ({'; '.join(changed)}); resume only with "
                       f"the same ones, {remedy}")


def write_record(directory: PathLike, command: str, determining: Mapping[str, Any], files: list[str]) -> Path:
    """Write a resumable folder's ``vsink-run.json`` (atomically)."""
    from .io import write_json
    from .version import __version__

    return write_json(Path(directory) / MANIFEST, {
        "command": command, "vsink_version": __version__, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "determining": dict(determining), "files": files + [MANIFEST]})


def fresh_folder(out: PathLike) -> Path:
    """The first of ``OUT-2``, ``OUT-3``, ... that does not exist (for ``--new-run``)."""
    out = Path(out)
    n = 2
    while True:
        candidate = out.with_name(f"{out.name}-{n}")
        if not candidate.exists() and not candidate.is_symlink():
            return candidate
        n += 1


__all__ = ["StaleRun", "check_resume", "content_hash", "differences", "file_sha256", "files_fingerprint",
           "fresh_folder", "recorded", "weights_fingerprint", "write_record"]
