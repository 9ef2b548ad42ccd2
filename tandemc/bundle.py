"""Drafter bundles: everything of a tandem checkpoint except its primary, to ship beside a primary users get
elsewhere (a GGUF file from a package), and the checked way to attach one to that primary again.

A bundle is a directory: `bundle.json` (format version, the tandem's config, and the SHA-256 of each primary tensor
it was trained with, as float32 bytes) and `drafters.safetensors` (the secondary, tandem projections, the variant's
MLP, router, drafter and draft vocabulary; floats stored in bfloat16 by default, half the bytes of float32 and
within the noise of training). Attaching checks the primary's config and every hash, so a bundle is never run
against weights it was not trained for: the secondary reads the primary's representations, which any other
primary (another quantization, another fine-tune) lays out differently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from tandemc import safetensors_io
from tandemc.artifact import read_format_json
from tandemc.atomic import atomic_directory
from tandemc.checkpoint import Checkpoint
from tandemc.config import TandemConfig
from tandemc.errors import TandemcError
from tandemc.params import INTEGER_TENSORS, check_draft_vocab, check_tensors, checkpoint_shapes, flatten, np_dtype, \
    unflatten

FORMAT, VERSION = "tandemc-drafters", 1
MANIFEST, WEIGHTS = "bundle.json", "drafters.safetensors"


def primary_digests(primary: dict) -> dict[str, str]:
    """SHA-256 of each primary tensor's float32 bytes, by dotted name: the same whatever dtype it is held in."""
    return {name: hashlib.sha256(np.ascontiguousarray(np.asarray(value, np.float32)).tobytes()).hexdigest()
            for name, value in sorted(flatten(primary, "primary").items())}


def write_bundle(ckpt: Checkpoint, path: Path, dtype: str = "bfloat16", force: bool = False) -> dict:
    """Write `ckpt` without its primary; returns the manifest."""
    flat = {name: np.asarray(value) for name, value in flatten(ckpt.params).items() if not name.startswith("primary.")}
    target = np_dtype(dtype)
    stored = {name: value if name in INTEGER_TENSORS else value.astype(target) for name, value in flat.items()}
    manifest = {"format": FORMAT, "version": VERSION, "dtype": dtype, "config": ckpt.config.to_dict(),
                "primary_sha256": primary_digests(ckpt.params["primary"])}
    with atomic_directory(path, force, sources=(ckpt.path,)) as tmp:
        safetensors_io.write(tmp / WEIGHTS, stored, {"format": FORMAT})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_bundle(path: Path) -> tuple[dict, dict]:
    """(manifest, flat tensors) of a bundle, its format checked."""
    path = Path(path)
    if not (path / MANIFEST).is_file() or not (path / WEIGHTS).is_file():
        raise TandemcError(f"{path} is not a drafter bundle (it needs {MANIFEST} and {WEIGHTS}; make one with "
                           "`tandemc detach`)")
    manifest = read_format_json(path / MANIFEST, FORMAT, "drafter bundle manifest")
    if manifest.get("version") != VERSION:
        raise TandemcError(f"{path} is bundle version {manifest.get('version')!r}; this tandemc reads version "
                           f"{VERSION}")
    if not isinstance(manifest.get("primary_sha256"), dict) or not isinstance(manifest.get("config"), dict):
        raise TandemcError(f"{path / MANIFEST} lacks its config or primary_sha256")
    return manifest, safetensors_io.read(path / WEIGHTS)


def attach(cfg: TandemConfig, params: dict, path: Path) -> tuple[TandemConfig, dict]:
    """The tandem of a bundle and a primary (`cfg.primary`, `params["primary"]`, e.g. just imported from GGUF):
    the bundle's config with the primary's tokenizer, dtype and export passes, its tensors cast to that dtype.
    Refused unless the primary is the one the bundle was trained with, tensor for tensor."""
    manifest, tensors = read_bundle(path)
    bundled = TandemConfig.from_dict(manifest["config"])
    if bundled.primary != cfg.primary:
        changed = [f.name for f in dataclasses.fields(cfg.primary)
                   if getattr(cfg.primary, f.name) != getattr(bundled.primary, f.name)]
        raise TandemcError(f"{path} was trained for another primary (primary.{changed[0]} is "
                           f"{getattr(bundled.primary, changed[0])}, this one's {getattr(cfg.primary, changed[0])})")
    expected, actual = manifest["primary_sha256"], primary_digests(params["primary"])
    differing = sorted(name for name in actual if expected.get(name) != actual[name])
    if differing or set(expected) != set(actual):
        name = differing[0] if differing else sorted(set(expected) ^ set(actual))[0]
        raise TandemcError(f"{path} was trained with other primary weights ({len(differing) or 'some'} tensors "
                           f"differ, first '{name}'); import the same GGUF file the bundle was made from")
    out_cfg = dataclasses.replace(bundled, tokenizer=cfg.tokenizer, dtype=cfg.dtype,
                                  export_passes=cfg.export_passes).validate()
    target = np_dtype(out_cfg.dtype)
    flat = {name: value if name in INTEGER_TENSORS else np.asarray(value).astype(target)
            for name, value in tensors.items()}
    shapes = {n: s for n, s in checkpoint_shapes(out_cfg).items() if not n.startswith("primary.")}
    check_tensors(shapes, {n: (safetensors_io.dtype_name(a), a.shape) for n, a in flat.items()}, out_cfg.dtype,
                  f"{path.name}/{WEIGHTS}")
    out = {**unflatten(flat), "primary": params["primary"]}
    check_draft_vocab(out, f"{path.name}/{WEIGHTS}")
    return out_cfg, out
