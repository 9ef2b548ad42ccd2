"""The TPU target: each traced graph as a serialized `jax.export` module (StableHLO) plus its readable `.mlir`.

Weights are graph arguments, stored once in the artifact's weights file, never baked in as constants. One module
serves several platforms (default `tpu` and `cpu`), so the artifact verified here is the one that runs on TPUs.
Source locations are left out of the modules: an artifact must not depend on where tandemc is installed.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import jax
from jax import export

from tandemc.errors import TandemcError
from tandemc.trace import Graph

PLATFORMS = ("tpu", "cpu", "cuda", "rocm")
DEFAULT_PLATFORMS = ("tpu", "cpu")
MODULE_SUFFIX = ".jaxexport"


def check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
    for p in platforms:
        if p not in PLATFORMS:
            raise TandemcError(f"unknown platform {p!r}; choose from {', '.join(PLATFORMS)}")
    if not platforms or len(set(platforms)) != len(platforms):
        raise TandemcError("--platforms must name one or more distinct platforms, e.g. tpu,cpu")
    return tuple(platforms)


@contextlib.contextmanager
def no_source_locations():
    old = jax.config.jax_traceback_in_locations_limit
    jax.config.update("jax_traceback_in_locations_limit", 0)
    try:
        yield
    finally:
        jax.config.update("jax_traceback_in_locations_limit", old)


def export_graph(graph: Graph, platforms: Sequence[str], shardings=None) -> export.Exported:
    """Lower one graph for `platforms`; `shardings` (in, out) places it on a device mesh."""
    jitted = jax.jit(graph.fn, **({} if shardings is None else
                                  {"in_shardings": shardings[0], "out_shardings": shardings[1]}))
    with no_source_locations():
        return export.export(jitted, platforms=tuple(platforms))(*graph.arg_structs())


def lower(graphs: list[Graph], platforms: Sequence[str], shardings=None) -> dict[str, bytes]:
    """Artifact files for every graph: `<key>.jaxexport` (serialized) and `<key>.mlir` (text)."""
    files = {}
    for graph in graphs:
        exported = export_graph(graph, platforms, shardings(graph) if shardings else None)
        files[graph.key + MODULE_SUFFIX] = bytes(exported.serialize())
        files[graph.key + ".mlir"] = exported.mlir_module().encode()
    return files
