"""Tandem checkpoints: a directory with `config.json` and `model.safetensors` (format: docs/checkpoint.md).

Loading is strict. Every tensor the config implies must be present with the config's dtype and shape, nothing
else may be, and every weight must be finite; each failure is a one-line error naming the tensor or field.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tandemc import safetensors_io
from tandemc.atomic import atomic_directory
from tandemc.config import TandemConfig
from tandemc.errors import TandemcError
from tandemc.params import check_draft_vocab, check_tensors, checkpoint_shapes, flatten, unflatten
from tandemc.tokenizer import load_tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class Checkpoint:
    config: TandemConfig
    params: dict[str, Any]  # nested pytree of numpy arrays
    tokenizer: Any
    path: Path | None = None


def check_finite(flat: dict[str, np.ndarray], source: str) -> None:
    for name in sorted(flat):
        array = flat[name]
        if not np.isfinite(np.asarray(array, np.float32)).all():
            kind = "NaN" if np.isnan(np.asarray(array, np.float32)).any() else "Inf"
            raise TandemcError(f"{source}: tensor '{name}' contains {kind} values")


def read_config(file: Path) -> TandemConfig:
    """Parse and validate a tandem config.json."""
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise TandemcError(f"{file.name} is not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    except UnicodeDecodeError:
        raise TandemcError(f"{file.name} is not UTF-8 text") from None
    return TandemConfig.from_dict(data)


def inspect_checkpoint(path: str | Path) -> tuple[TandemConfig, dict]:
    """Config and safetensors header, checked against each other without reading the weights."""
    path = Path(path)
    if not path.is_dir():
        raise TandemcError(f"checkpoint directory {path} does not exist")
    if not (path / CONFIG_FILE).is_file():
        raise TandemcError(f"{path} has no {CONFIG_FILE}; is it a tandem checkpoint directory?")
    cfg = read_config(path / CONFIG_FILE)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise TandemcError(f"{path} has no {WEIGHTS_FILE}")
    header, _, _ = safetensors_io.read_header(weights)
    check_tensors(checkpoint_shapes(cfg),
                  {n: (safetensors_io.DTYPE_CODES[e["dtype"]], tuple(e["shape"])) for n, e in header.items()},
                  cfg.dtype, WEIGHTS_FILE)
    return cfg, header


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    cfg, _ = inspect_checkpoint(path)
    flat = safetensors_io.read(path / WEIGHTS_FILE)
    check_finite(flat, WEIGHTS_FILE)
    tokenizer = load_tokenizer(cfg.tokenizer, path)
    if tokenizer.vocab_size > cfg.primary.vocab_size:
        raise TandemcError(f"the tokenizer has {tokenizer.vocab_size} tokens but config field 'primary.vocab_size' "
                           f"is {cfg.primary.vocab_size}")
    params = unflatten(flat)
    check_draft_vocab(params, WEIGHTS_FILE)
    return Checkpoint(cfg, params, tokenizer, path)


def save_checkpoint(path: str | Path, cfg: TandemConfig, params: dict[str, Any], *,
                    tokenizer_file: Path | bytes | None = None, force: bool = False) -> Path:
    """Validate, then write atomically. The same config and parameters always give the same bytes.
    `tokenizer_file`: the tokenizer.json to store, as a path or its contents."""
    cfg.validate()
    flat = {name: np.asarray(value) for name, value in flatten(params).items()}
    check_tensors(checkpoint_shapes(cfg), {n: (safetensors_io.dtype_name(a), a.shape) for n, a in flat.items()},
                  cfg.dtype, "parameters")
    check_finite(flat, "parameters")
    check_draft_vocab(params, "parameters")
    if cfg.tokenizer.type == "hf" and tokenizer_file is None:
        raise TandemcError("config uses a Hugging Face tokenizer; pass its tokenizer.json")
    with atomic_directory(path, force) as tmp:
        (tmp / CONFIG_FILE).write_text(cfg.to_json())
        safetensors_io.write(tmp / WEIGHTS_FILE, flat, {"format": "tandemc", "schema_version": str(cfg.schema_version)})
        if isinstance(tokenizer_file, bytes):
            (tmp / cfg.tokenizer.file).write_bytes(tokenizer_file)
        elif tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / cfg.tokenizer.file)
    return Path(path)
