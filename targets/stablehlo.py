"""The TPU target: each traced graph as a serialized `jax.export` module (StableHLO) plus its readable `.mlir`.

Weights are graph arguments, stored once in the artifact's weights file, never baked in as constants. One module
serves several platforms (default `tpu` and `cpu`), so the artifact verified here is the one that runs on TPUs.
Source locations are left out of the modules: an artifact must not depend on where tandemc is installed.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import jax
import numpy as np
from jax import export
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tandemc.errors import TandemcError
from tandemc.trace import Graph, TensorSpec

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


def donated_arguments(graph: Graph) -> tuple[int, ...]:
    """Argument indices (weights first, then inputs) of the state inputs the graph replaces. Donated, so each module
    aliases them to their outputs (`tf.aliasing_output`) and a runtime updates the caches in place instead of
    holding two copies."""
    state_inputs = set(graph.state_wiring.values())
    return tuple(len(graph.weights) + i for i, t in enumerate(graph.inputs) if t.name in state_inputs)


def export_graph(graph: Graph, platforms: Sequence[str], shardings=None) -> export.Exported:
    """Lower one graph for `platforms`; `shardings` (in, out) places it on a device mesh."""
    jitted = jax.jit(graph.fn, donate_argnums=donated_arguments(graph),
                     **({} if shardings is None else {"in_shardings": shardings[0], "out_shardings": shardings[1]}))
    with no_source_locations():
        return export.export(jitted, platforms=tuple(platforms))(*graph.arg_structs())


def module_signature(graph: Graph, exported: export.Exported) -> dict:
    """How the module's own arguments relate to the manifest's "weights, then inputs" (docs/artifact.md): with
    more than one platform the first argument is the platform index (0-based into `platforms`), and jax.export
    drops the arguments the computation never reads (e.g. prefill's drafter weights); `kept_arguments` names the
    rest, in the module's order."""
    names = [t.name for t in graph.weights + graph.inputs]
    return {"calling_convention_version": exported.calling_convention_version,
            "platform_index_argument": len(exported.platforms) > 1,
            "kept_arguments": [names[i] for i in exported.module_kept_var_idx],
            "donated_arguments": [names[i] for i in donated_arguments(graph)]}


def stablehlo_version(exported: export.Exported) -> str:
    """The StableHLO version the module is serialized at (a portable artifact's producer tag, e.g. 1.13.0):
    consumers from that version up to about six months newer deserialize it."""
    data = bytes(exported.mlir_module_serialized)
    tag = data.find(b"StableHLO_v")
    if tag < 0:
        return "unknown"
    end = tag + len(b"StableHLO_v")
    while end < len(data) and (data[end:end + 1].isdigit() or data[end:end + 1] == b"."):
        end += 1
    return data[tag + len(b"StableHLO_v"):end].decode()


def lower(graphs: list[Graph], platforms: Sequence[str], mesh: tuple[int, int] | None = None,
          batch: int = 1) -> tuple[dict[str, bytes], dict[str, dict], dict]:
    """Artifact files for every graph (`<key>.jaxexport` serialized, `<key>.mlir` text), each graph's
    `module_signature`, and the versions a consumer checks (`toolchain_versions`)."""
    files, signatures = {}, {}
    device_mesh = make_mesh(mesh) if mesh else None
    exported = None
    for graph in graphs:
        shardings = None
        if mesh:
            shardings = tuple(tuple(NamedSharding(device_mesh, PartitionSpec(*spec)) for spec in specs)
                              for specs in graph_partition_specs(graph, mesh, batch))
        exported = export_graph(graph, platforms, shardings)
        files[graph.key + MODULE_SUFFIX] = bytes(exported.serialize())
        files[graph.key + ".mlir"] = exported.mlir_module().encode()
        signatures[graph.key] = module_signature(graph, exported)
    return files, signatures, toolchain_versions(exported)


def toolchain_versions(exported: export.Exported) -> dict:
    """What decides whether a consumer can load the modules: jax.export guarantees to deserialize and run what
    it serialized for about six months of newer jax/jaxlib releases (docs/artifact.md)."""
    import jaxlib
    from jax._src.export import serialization  # the flatbuffer schema version has no public name

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "jax_export_serialization_version": serialization._SERIALIZATION_VERSION,
            "calling_convention_version": exported.calling_convention_version,
            "stablehlo": stablehlo_version(exported)}


# --- tensor parallelism: heads and MLP width over the `model` axis, batch over `data` ---------------------------

MESH_AXES = ("data", "model")
COLUMN_PARALLEL = ("wq", "wk", "wv", "w_gate", "w_up")  # [d_in, heads·hd or d_ff]: split the output dimension
ROW_PARALLEL = ("wo", "w_down")  # [heads·hd or d_ff, d_out]: split the input dimension


def make_mesh(shape: tuple[int, int]) -> Mesh:
    devices = jax.devices()
    need = shape[0] * shape[1]
    if len(devices) < need:
        raise TandemcError(f"mesh {shape[0]}x{shape[1]} needs {need} devices, this host has {len(devices)}; on a CPU "
                           f"host set XLA_FLAGS=--xla_force_host_platform_device_count={need}")
    return Mesh(np.array(devices[:need]).reshape(shape), MESH_AXES)


def partition_spec(tensor: TensorSpec, batch: int, mesh_shape: tuple[int, int]) -> tuple:
    """Where a graph input or output lives on the mesh, from its name and shape (replicated where nothing divides).

    Attention and MLP weights are split Megatron-style (column- then row-parallel), KV caches by KV head, and
    anything with a leading batch dimension (state, tokens, uniforms) by row.
    """
    data, model = mesh_shape
    shape, leaf = tensor.shape, tensor.name.rsplit(".", 1)[-1]
    spec = [None] * len(shape)
    if tensor.name.startswith(("primary.", "secondary.", "drafter.")) and len(shape) == 2:
        axis = 1 if leaf in COLUMN_PARALLEL else 0 if leaf in ROW_PARALLEL else None
        if axis is not None and shape[axis] % model == 0:
            spec[axis] = "model"
        return tuple(spec)
    batch_axis = 1 if tensor.name == "u_steps" else 0
    if len(shape) > batch_axis and shape[batch_axis] == batch and batch % data == 0:
        spec[batch_axis] = "data"
    if tensor.name.startswith(("state.", "new_state.")) and len(shape) == 4 and shape[1] % model == 0:
        spec[1] = "model"  # KV cache [B, kv_heads, S, head_dim]
    return tuple(spec)


def graph_partition_specs(graph: Graph, mesh_shape: tuple[int, int], batch: int) -> tuple[list, list]:
    """Partition specs of (weights + inputs, outputs), in call order."""
    return ([partition_spec(t, batch, mesh_shape) for t in graph.weights + graph.inputs],
            [partition_spec(t, batch, mesh_shape) for t in graph.outputs])
