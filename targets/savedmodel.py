"""TensorFlow SavedModel for TF Serving, wrapping the same StableHLO as the TPU target (`export --savedmodel`).

`jax2tf` with native serialization embeds each graph's StableHLO module (for the artifact's platforms) in an
XlaCallModule op. The weights become SavedModel variables, stored once and shared by every signature; each
signature is one graph (`prefill_s256`, `step_s256`, ...) whose inputs and outputs carry the manifest's names.
Needs the optional extra `tandemc[tf]` (tensorflow-cpu).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from tandemc.errors import TandemcError
from tandemc.trace import Graph

DIRECTORY = "savedmodel"


def import_tensorflow():
    try:
        import tensorflow as tf
    except ImportError:
        raise TandemcError("--savedmodel needs TensorFlow; install the extra: pip install 'tandemc[tf]'") from None
    return tf


def signature_name(graph_key: str) -> str:
    return graph_key.replace(".", "_")


def tensor_name(name: str) -> str:
    """Signature keys: the manifest name with dots as double underscores (TF Serving's key alphabet)."""
    return name.replace(".", "__")


def write(directory: Path, graphs: list[Graph], weights: dict[str, np.ndarray], platforms: Sequence[str]) -> None:
    tf = import_tensorflow()
    from jax.experimental import jax2tf

    from tandemc.targets.stablehlo import no_source_locations

    module = tf.Module()
    names = [w.name for w in graphs[0].weights]
    module.weights = [tf.Variable(weights[n], trainable=False, name=tensor_name(n)) for n in names]
    signatures = {}
    for graph in graphs:
        converted = jax2tf.convert(graph.fn, native_serialization_platforms=tuple(platforms), with_gradient=False)
        specs = [tf.TensorSpec(t.shape, tf.as_dtype(t.dtype), name=tensor_name(t.name)) for t in graph.inputs]

        with no_source_locations():
            signatures[signature_name(graph.key)] = tf.function(
                _with_weights(converted, module.weights, graph), input_signature=specs,
                autograph=False).get_concrete_function()
    module.signatures_for_serving = signatures
    tf.saved_model.save(module, str(directory / DIRECTORY), signatures=signatures)


def _with_weights(converted, weights, graph: Graph):
    """The graph as a function of its non-weight inputs, returning outputs by (signature) name."""
    def call(*inputs):
        outputs = converted(*weights, *inputs)
        return {tensor_name(t.name): out for t, out in zip(graph.outputs, outputs)}
    return call
