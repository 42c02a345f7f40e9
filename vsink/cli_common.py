"""What the ``vsink`` command modules share: reading the image-directory argument, loading the
LVLM of ``--model``, parsing ``--set`` assignments, fingerprinting the files settings name."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import VsinkError


def image_dir_arg(args: argparse.Namespace, old_key: str) -> Optional[str]:
    """The positional IMAGE_DIR, or the deprecated ``--images DIR`` stored under ``old_key``."""
    old = getattr(args, old_key)
    if args.images and old:
        raise VsinkError("give the image directory as a positional argument only (--images is the deprecated "
                         "spelling)")
    return args.images or old


def shard_of(args: argparse.Namespace):
    """The :class:`vsink.shard.Shard` :func:`vsink.cli.main` joined (one process alone when none was)."""
    from .shard import Shard

    return getattr(args, "shard", None) or Shard()


def load_lvlm_for(args: argparse.Namespace):
    """The LVLM of ``--model`` (``hf:`` prefix optional) with ``--device`` (under torchrun ``auto``
    and ``cuda`` mean this process's GPU), ``--dtype``, ``--trust-remote-code`` and
    ``--device-map`` / ``--offload-folder`` (one process only); says so on stderr when it is a
    synthetic model (rank 0 only)."""
    from .backbones.hf_lvlm import load_lvlm
    from .backbones.registry import resolve_dtype

    repo = args.model.removeprefix("hf:")
    shard = shard_of(args)
    if args.device_map is not None and not shard.alone:
        raise VsinkError("--device-map places one model across this node's devices in one process; under torchrun "
                         "each rank holds a whole model (leave --device-map out, or run one process)")
    lvlm = load_lvlm(repo, device=shard.device(args.device), dtype=resolve_dtype(args.dtype),
                     trust_remote_code=args.trust_remote_code, device_map=args.device_map,
                     offload_folder=args.offload_folder)
    if not shard.main:
        return lvlm
    if lvlm.synthetic:
        print(f"vsink: model {lvlm.spec!r} is SYNTHETIC: {lvlm.synthetic_note}", file=sys.stderr)
    print(f"vsink: {lvlm.spec}: {lvlm.model_type} ({lvlm.family} family), {lvlm.num_layers} decoder layers",
          file=sys.stderr)
    return lvlm


def parse_settings(pairs: Sequence[str]) -> dict:
    """``--set KEY=VALUE`` options → a dict."""
    from .assignments import parse_assignment

    return dict(parse_assignment(item, "--set") for item in pairs)


def setting_files(settings: dict[str, Any]) -> dict[str, str]:
    """The SHA-256 of each setting whose value names a file (``ttr.neurons``): the file, not its
    path, determines the answers, so a file changed in place is a changed run."""
    from .manifest import file_sha256

    return {key: file_sha256(value) for key, value in sorted(settings.items())
            if isinstance(value, (str, os.PathLike)) and Path(value).is_file()}
