"""The artifact directory (docs/artifact.md): manifest.json, graph files, one weights file, the tokenizer.

The manifest is the contract with runtimes in any language: it lists every graph's inputs and outputs by name,
which state output feeds which input on the next call, the decode settings, and the sha256 of every other file.
Writing is atomic and deterministic (sorted keys, no timestamps or absolute paths), so the same inputs give a
byte-identical artifact.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from tandemc import __version__, safetensors_io
from tandemc.config import TandemConfig
from tandemc.errors import TandemcError
from tandemc.program import Program
from tandemc.trace import Graph, mode_params, named_leaves, step_graph_name

FORMAT = "tandemc-artifact"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
TARGETS = ("tpu", "cpu", "gpu")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def artifact_files(directory: Path) -> list[str]:
    """Every file under the artifact (relative POSIX paths, sorted), except the manifest and hidden files; symbolic
    links count as files, so a listing check sees them."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.name != MANIFEST and not p.name.startswith("."))


def inside(directory: Path, name: object, what: str) -> Path:
    """`name`, read from a manifest, as a path inside the artifact `directory`: a plain relative POSIX path (no
    `..`, `.`, empty or absolute parts, no backslashes) with no symbolic link along it. An artifact is untrusted
    input: nothing in it may make tandemc read or hash a file outside its directory."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or "\\" in name or any(part in ("", ".", "..") for part in parts):
        raise TandemcError(f"{directory / MANIFEST}: {what} {name!r} is not a plain relative path inside the "
                           "artifact; the manifest is corrupt or was tampered with: re-export")
    path = directory
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise TandemcError(f"{path} is a symbolic link; an artifact's files must lie inside it: re-export")
    return path


def referenced_files(manifest: dict) -> list[tuple[str, object]]:
    """(what, name) of every file the manifest tells a runtime to open."""
    refs = [("weights_file", manifest.get("weights_file"))]
    graphs = manifest.get("graphs")
    for key, entry in (graphs.items() if isinstance(graphs, dict) else []):
        for field in ("onnx", "module", "text"):
            if isinstance(entry, dict) and field in entry:
                refs.append((f"graph {key}'s {field} file", entry[field]))
    tokenizer = manifest.get("tokenizer")
    if isinstance(tokenizer, dict) and tokenizer.get("file"):
        refs.append(("tokenizer file", tokenizer["file"]))
    return refs


def graph_entry(graph: Graph, target_fields: dict) -> dict:
    """A graph's manifest entry; `target_fields` (its files, and what the target records per graph) come last, so
    an ONNX graph's `weights` are the initializers its file reads."""
    return {
        "name": graph.name, "seq_len": graph.seq_len,
        "weights": [w.name for w in graph.weights],
        "inputs": [t.to_dict() for t in graph.inputs],
        "outputs": [t.to_dict() for t in graph.outputs],
        "state": graph.state_wiring,
        **target_fields,
    }


def write_files(directory: Path, program: Program, graphs: list[Graph], graph_files: dict[str, bytes],
                graph_file_names: dict[str, dict[str, str]], target: str, extra: dict[str, Any],
                tokenizer, tokenizer_file: Path | None) -> dict:
    """Write graphs and tokenizer into `directory` (weights: `write_weights`, first); return the manifest (written
    by `write_manifest`)."""
    for name, data in sorted(graph_files.items()):
        (directory / name).write_bytes(data)
    cfg = program.config
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, directory / cfg.tokenizer.file)
    opts = program.options
    manifest = {
        "format": FORMAT, "schema_version": SCHEMA_VERSION, "tandemc_version": __version__, "target": target,
        "model": cfg.to_dict(),
        "decode": {"mode": opts.mode, "block_length": program.gamma,
                   "block_lengths": list(opts.step_gammas(cfg)), "batch": opts.batch,
                   "prefill_chunk": opts.prefill_chunk, "max_new_tokens": opts.max_new_tokens,
                   "cache_buckets": list(opts.max_seq_len), "dtype": opts.dtype},
        "tokenizer": {"type": cfg.tokenizer.type, "file": cfg.tokenizer.file or None, "bos_id": tokenizer.bos_id,
                      "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id},
        "weights_file": WEIGHTS,
        "graphs": {g.key: graph_entry(g, graph_file_names[g.key]) for g in graphs},
        "passes": list(program.passes),
        **extra,
    }
    return manifest


def write_weights(directory: Path, program: Program, graphs: list[Graph]) -> dict[str, tuple[str, int, int]]:
    """The shared weights file; returns each weight's (file, offset, length), for targets that reference it."""
    safetensors_io.write(directory / WEIGHTS, graph_weights(program, graphs), {"format": FORMAT})
    return {name: (WEIGHTS, offset, length)
            for name, (offset, length) in safetensors_io.tensor_locations(directory / WEIGHTS).items()}


def graph_weights(program: Program, graphs: list[Graph]) -> dict[str, np.ndarray]:
    """The weights the graphs take, by name (every graph of an artifact takes the same ones)."""
    flat = dict(named_leaves(mode_params(program.params, program.options.mode)))
    return {w.name: np.asarray(flat[w.name]) for w in graphs[0].weights}


def write_manifest(directory: Path, manifest: dict) -> dict:
    """Write manifest.json, hashing every other file unless `manifest` already lists them; returns the manifest as
    a runtime reads it back."""
    if "files" not in manifest:
        manifest = {**manifest, "files": {name: sha256(directory / name) for name in artifact_files(directory)}}
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    (directory / MANIFEST).write_text(text)
    return json.loads(text)


def read_format_json(file: Path, format_name: str, what: str) -> dict:
    """A JSON object whose "format" field must be `format_name` (artifact and bundle manifests): one line naming
    `file` when it is not readable JSON or not that format."""
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TandemcError(f"{file} is not valid JSON") from None
    if not isinstance(data, dict) or data.get("format") != format_name:
        raise TandemcError(f"{file} is not a {what} (format is not {format_name!r})")
    return data


def read_manifest(path: str | Path) -> dict:
    """The manifest of an artifact directory, after checking its format, schema version, that every file it lists
    or names lies inside the directory (`inside`), that it lists every file there, and their hashes."""
    path = Path(path)
    file = path / MANIFEST
    if not path.is_dir():
        raise TandemcError(f"artifact directory {path} does not exist")
    if not file.is_file():
        raise TandemcError(f"{path} has no {MANIFEST}; is it a tandemc artifact directory?")
    manifest = read_format_json(file, FORMAT, "tandemc artifact manifest")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise TandemcError(f"{file} has schema_version {manifest.get('schema_version')}; this tandemc reads version "
                           f"{SCHEMA_VERSION}: re-export the artifact with this tandemc")
    if manifest.get("target") not in TARGETS:
        raise TandemcError(f"{file} names unknown target {manifest.get('target')!r}")
    check_fields(manifest, file)
    hashes = manifest.get("files")
    if not isinstance(hashes, dict) or not all(isinstance(d, str) and len(d) == 64 for d in hashes.values()):
        raise TandemcError(f"{file} has no valid 'files' table of sha256 digests; re-export the artifact")
    for name in hashes:
        inside(path, name, "listed file")
    for what, name in referenced_files(manifest):
        inside(path, name, what)
        if name not in hashes:
            raise TandemcError(f"{file}: {what} {name!r} is not among the manifest's hashed files; re-export")
    for name in artifact_files(path):
        if name not in hashes:
            raise TandemcError(f"{path / name} is not listed in the manifest; remove it or re-export")
    for name, digest in sorted(hashes.items()):
        if not (path / name).is_file():
            raise TandemcError(f"{path / name} is missing; the artifact is incomplete, re-export it")
        if sha256(path / name) != digest:
            raise TandemcError(f"{path / name} does not match its sha256 in the manifest; the artifact was "
                               "modified or corrupted, re-export it")
    return manifest


def manifest_config(manifest: dict) -> TandemConfig:
    return TandemConfig.from_dict(manifest["model"])


def block_lengths(decode: dict) -> list[int]:
    """The block lengths an artifact has step graphs for (decode.block_lengths; artifacts from before it had one)."""
    return decode.get("block_lengths", [decode.get("block_length")])


def check_fields(manifest: dict, file: Path) -> None:
    """The fields a runtime reads, with the types it needs, and consistent with each other: the decode settings
    against every graph's inputs and outputs, the model against the logits. A manifest edited to claim another
    mode, block length or model than its graphs were built for is refused, not obeyed."""
    def bad(field, want):
        raise TandemcError(f"{file}: field '{field}' must be {want}; the manifest is corrupt or was edited: "
                           "re-export the artifact")

    def need(value, kind, field, want):
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            bad(field, want)
        return value

    decode = need(manifest.get("decode"), dict, "decode", "an object")
    for name in ("batch", "block_length", "prefill_chunk", "max_new_tokens"):
        if need(decode.get(name), int, f"decode.{name}", "an integer") < (0 if name == "block_length" else 1):
            bad(f"decode.{name}", "positive")
    buckets = need(decode.get("cache_buckets"), list, "decode.cache_buckets", "a list of cache lengths")
    if not buckets or not all(isinstance(b, int) and b > 0 for b in buckets):
        bad("decode.cache_buckets", "a non-empty list of positive integers")
    if need(decode.get("mode"), str, "decode.mode", "a string") == "primary" and decode["block_length"] != 0:
        bad("decode.block_length", "0 in primary mode")
    gammas = block_lengths(decode)
    if not (isinstance(gammas, list) and gammas == sorted(set(gammas)) and decode["block_length"] in gammas
            and all(isinstance(g, int) and not isinstance(g, bool) and 0 <= g <= 64 for g in gammas)):
        bad("decode.block_lengths", "an increasing list of block lengths in 0..64 holding decode.block_length")
    need(manifest.get("weights_file"), str, "weights_file", "a file name")
    tokenizer = need(manifest.get("tokenizer"), dict, "tokenizer", "an object")
    for name in ("bos_id", "eos_id"):
        need(tokenizer.get(name), int, f"tokenizer.{name}", "an integer")
    try:
        config = manifest_config(manifest)
    except TandemcError as e:
        raise TandemcError(f"{file}: field 'model': {e}") from None
    graphs = need(manifest.get("graphs"), dict, "graphs", "an object")
    if not graphs:
        bad("graphs", "a non-empty object")
    step_names = {step_graph_name(g, decode["block_length"]): g for g in gammas}
    for seq_len in buckets:
        for name in ("prefill", *step_names):
            if f"{name}.s{seq_len}" not in graphs:
                raise TandemcError(f"{file}: cache length {seq_len} has no graph {name}.s{seq_len}; the artifact "
                                   "is incomplete: re-export it")
    batch, gamma, chunk = decode["batch"], decode["block_length"], decode["prefill_chunk"]
    for key, entry in graphs.items():
        where = f"graphs.{key}"
        need(entry, dict, where, "an object")
        name = need(entry.get("name"), str, f"{where}.name", "a graph name")
        if need(entry.get("seq_len"), int, f"{where}.seq_len", "an integer") not in buckets or \
                key != f"{name}.s{entry['seq_len']}":
            bad(f"{where}.seq_len", f"one of decode.cache_buckets, in the key as {name}.s<seq_len>")
        specs = {}
        for side in ("inputs", "outputs"):
            for i, spec in enumerate(need(entry.get(side), list, f"{where}.{side}", "a list")):
                if not (isinstance(spec, dict) and isinstance(spec.get("name"), str)
                        and isinstance(spec.get("dtype"), str) and isinstance(spec.get("shape"), list)
                        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in spec["shape"])):
                    bad(f"{where}.{side}[{i}]", "{name, shape, dtype}")
                specs[side, spec["name"]] = spec["shape"]
        if not all(isinstance(w, str) for w in need(entry.get("weights"), list, f"{where}.weights", "a list")):
            bad(f"{where}.weights", "a list of tensor names")
        state = need(entry.get("state"), dict, f"{where}.state", "an object")
        if not all(("outputs", o) in specs and ("inputs", i) in specs for o, i in state.items()):
            bad(f"{where}.state", "a map from this graph's outputs to its inputs")
        expected = {"prefill": {("inputs", "tokens"): [batch, chunk]},
                    **{step: {("inputs", "u"): [batch, 2 * g + 1],
                              ("outputs", "logits"): [batch, g + 1, config.primary.vocab_size]}
                       for step, g in step_names.items()},
                    "generate": {("inputs", "u_steps"): [decode["max_new_tokens"], batch, 2 * gamma + 1]}}
        for (side, tensor), shape in expected.get(name, {}).items():
            if specs.get((side, tensor)) != shape:
                raise TandemcError(f"{file}: graph {key}'s {tensor} has shape {specs.get((side, tensor))} but the "
                                   f"decode settings and model say {shape}; the manifest does not describe its "
                                   "graphs: re-export the artifact")
