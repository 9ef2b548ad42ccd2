"""The GPU target: TensorRT-ready ONNX graphs, the profile they must satisfy, engine building and a runtime.

`export --target gpu` lowers the traced graphs with the ONNX lowering's `gpu` profile (standard operators only;
targets/onnx.py), checks every graph against TensorRT's profile (the table below), writes the engine build
specification into the manifest and, where `tensorrt` imports and a GPU is present, builds the engines. Anywhere
else `tandemc build-engine ARTIFACT` builds them later on the GPU host. Engines are specific to the TensorRT
version and GPU that built them; the manifest records both and the runtime refuses a mismatch.

The profile, enforced by `check_model` (and `tandemc check --target gpu`), follows TensorRT 10's ONNX parser:
strongly typed graphs (every tensor's type fixed by the graph: the network is created STRONGLY_TYPED, so
precision is what the graph says), opset ≤ 25, loop-free `prefill`/`step` graphs, standard-domain operators from
OPERATORS with their restrictions, tensor types from TYPES, and symmetric (zero point 0) Q/DQ for quantized weights.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx

from tandemc.errors import TandemcError

MAX_OPSET = 25
TOPK_MAX_K = 3840  # TensorRT's TopK limit
ENGINE_SUFFIX = ".engine"
TIMING_CACHE = "timing.cache"

# The operators tandemc's graphs can contain that TensorRT's ONNX parser (TensorRT 10) accepts. Maintained by
# hand from the parser's operator support matrix; a node outside it is reported by name. Restrictions that the
# checker verifies are in `_restrictions`.
OPERATORS = frozenset("""
Abs Add And ArgMax ArgMin Cast Ceil Clip Concat Constant ConstantOfShape Cos CumSum DequantizeLinear Div Einsum
Equal Erf Exp Expand Floor Gather GatherElements GatherND Greater GreaterOrEqual Identity If Less LessOrEqual Log
MatMul Max Min Mod Mul Neg Not Or Pad Pow QuantizeLinear Range Reciprocal ReduceMax ReduceMean ReduceMin ReduceProd
ReduceSum Reshape Round ScatterND Shape Sigmoid Sign Sin Size Slice Softmax Split Sqrt Squeeze Sub Tanh Tile TopK
Transpose Unsqueeze Where Xor
""".split())
# Tensor types TensorRT handles (int64 is supported, int32 preferred for indices; no float64 or unsigned ints
# beyond uint8).
TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
         onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT64: "int64",
         onnx.TensorProto.INT8: "int8", onnx.TensorProto.INT4: "int4", onnx.TensorProto.UINT8: "uint8",
         onnx.TensorProto.BOOL: "bool"}


def _value(tensor: onnx.TensorProto) -> np.ndarray | None:
    """An initializer's value where the model stores it (None for external data)."""
    return None if tensor.data_location == onnx.TensorProto.EXTERNAL else onnx.numpy_helper.to_array(tensor)


def _restrictions(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> str | None:
    """What is wrong with a supported operator's use, or None. `constants`: initializers by name."""
    if node.op_type == "TopK":
        if node.input[1] not in constants:
            return "K must be a constant (initializer)"
        k = _value(constants[node.input[1]])
        if k is not None and int(k.reshape(-1)[0]) > TOPK_MAX_K:
            return (f"K = {int(k.reshape(-1)[0])} exceeds TensorRT's {TOPK_MAX_K} (the gpu profile's sampler "
                    "does not sort: a graph that sorts a vocabulary this large cannot run in TensorRT)")
    if node.op_type in ("DequantizeLinear", "QuantizeLinear") and len(node.input) > 2 and node.input[2]:
        zero = _value(constants[node.input[2]]) if node.input[2] in constants else None
        if node.input[2] not in constants or (zero is not None and np.any(zero != 0)):
            return "TensorRT takes symmetric quantization only: the zero point must be a constant 0"
    block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
    if node.op_type == "DequantizeLinear" and block and node.input[0] in constants:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        rows = constants[node.input[0]].dims[axis]
        if rows % block:
            return (f"TensorRT's block quantization needs blocks that divide the axis ({rows} rows, blocks of "
                    f"{block}); quantize with a block that divides it")
    if node.op_type in ("CumSum", "Slice", "Squeeze", "Unsqueeze") and len(node.input) > 1:
        axes_input = node.input[1] if node.op_type != "Slice" else (node.input[3] if len(node.input) > 3 else "")
        if axes_input and axes_input not in constants:
            return "axes must be a constant (initializer)"
    return None


def check_model(model: onnx.ModelProto, name: str = "") -> list[str]:
    """Every violation of the TensorRT profile in one model, one line each naming the node or tensor."""
    problems = []
    where = f"{name}: " if name else ""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > MAX_OPSET:
            problems.append(f"{where}opset {opset.version} is newer than TensorRT's parser takes ({MAX_OPSET})")
        elif opset.domain not in ("", "ai.onnx"):
            problems.append(f"{where}imports operator domain {opset.domain!r}; TensorRT parses the standard domain "
                            "only")
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    typed = list(graph.input) + list(graph.output) + list(graph.value_info)
    for value in typed:
        elem = value.type.tensor_type.elem_type
        if elem not in TYPES:
            problems.append(f"{where}tensor '{value.name}' has type "
                            f"{onnx.TensorProto.DataType.Name(elem)}, which TensorRT does not take")
    for init in graph.initializer:
        if init.data_type not in TYPES:
            problems.append(f"{where}initializer '{init.name}' has type "
                            f"{onnx.TensorProto.DataType.Name(init.data_type)}, which TensorRT does not take")
    _check_nodes(graph.node, constants, problems, where)
    return problems


def _check_nodes(nodes, constants, problems, where):
    for index, node in enumerate(nodes):
        label = f"{where}node {index} '{node.name or node.output[0]}' ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{label}: domain {node.domain!r} is not parsed by TensorRT")
            continue
        if node.op_type in ("Loop", "Scan"):
            problems.append(f"{label}: prefill and step graphs must be loop-free")
            continue
        if node.op_type not in OPERATORS:
            problems.append(f"{label}: not in TensorRT's ONNX operator set")
            continue
        if node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            if to not in TYPES:
                problems.append(f"{label}: casts to {onnx.TensorProto.DataType.Name(to)}, which TensorRT does not take")
        problem = _restrictions(node, constants)
        if problem:
            problems.append(f"{label}: {problem}")
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                inner = {**constants, **{t.name: t for t in attribute.g.initializer}}
                _check_nodes(attribute.g.node, inner, problems, f"{where}{node.op_type} {attribute.name}: ")


def check_artifact(path: str | Path) -> dict:
    """Check every ONNX graph of an artifact directory; {graph key: [problems]}."""
    from tandemc.artifact import read_manifest

    path = Path(path)
    manifest = read_manifest(path)
    report = {}
    for key, entry in manifest["graphs"].items():
        if "onnx" not in entry:
            raise TandemcError(f"{path} is a {manifest['target']} artifact without ONNX graphs; check --target gpu "
                               "applies to gpu (and cpu) artifacts")
        model = onnx.load(str(path / entry["onnx"]), load_external_data=False)
        report[key] = check_model(model, key)
    return report


# --- engines ----------------------------------------------------------------------------------------------------

def build_spec(manifest: dict) -> dict:
    """How to build the engines: one per graph, static shapes (one optimization profile each), strongly typed."""
    return {
        "network_flags": ["STRONGLY_TYPED"],
        "timing_cache": TIMING_CACHE,
        "workspace_bytes": 4 << 30,
        "engines": {key: {"onnx": entry["onnx"], "engine": key + ENGINE_SUFFIX,
                          "profile": {spec["name"]: spec["shape"] for spec in entry["inputs"]}}
                    for key, entry in manifest["graphs"].items()},
    }


def environment() -> tuple[object, str] | None:
    """(tensorrt module, GPU name) when TensorRT imports and a CUDA GPU is visible, else None."""
    try:
        import tensorrt
    except ImportError:
        return None
    try:
        name = _cuda_device_name()
    except Exception:  # no driver, no device, no cuda-python
        return None
    return tensorrt, name


def missing_reason() -> str:
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed (pip install tensorrt on the GPU host)"
    try:
        _cuda_device_name()
    except Exception as e:
        return f"no CUDA GPU is usable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return ""


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart  # cuda-python before 12.6
    return cudart


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise TandemcError(f"CUDA call failed with error {int(err)}")
    return rest[0] if len(rest) == 1 else rest


def _cuda_device_name() -> str:
    cudart = _cudart()
    props = _check(cudart.cudaGetDeviceProperties(0))
    name = props.name
    return (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00")


def build_engines(path: str | Path, log=print) -> dict:
    """Build every graph's engine with the TensorRT Python API and record them in the manifest (on the GPU host)."""
    from tandemc.artifact import read_manifest, write_manifest

    path = Path(path)
    manifest = read_manifest(path)
    if manifest["target"] != "gpu":
        raise TandemcError(f"{path} is a {manifest['target']} artifact; build-engine takes gpu artifacts")
    env = environment()
    if env is None:
        raise TandemcError(f"cannot build TensorRT engines here: {missing_reason()}; run `tandemc build-engine "
                           f"{path}` on the GPU host")
    trt, gpu = env
    spec = manifest["tensorrt"]["build"]
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_file = path / spec["timing_cache"]
    config_cache = cache_file.read_bytes() if cache_file.is_file() else b""
    built = {}
    for key, entry in spec["engines"].items():
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(path / entry["onnx"])):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise TandemcError(f"TensorRT could not parse {entry['onnx']}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec["workspace_bytes"])
        cache = config.create_timing_cache(config_cache)
        config.set_timing_cache(cache, False)
        profile = builder.create_optimization_profile()  # the bucket's static shapes: min = opt = max
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shape = entry["profile"][tensor.name]
            if shape:
                profile.set_shape(tensor.name, shape, shape, shape)
        config.add_optimization_profile(profile)
        log(f"building {entry['engine']} ...")
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise TandemcError(f"TensorRT failed to build the engine for {key}")
        (path / entry["engine"]).write_bytes(bytes(serialized))
        config_cache = bytes(cache.serialize())
        built[key] = entry["engine"]
    cache_file.write_bytes(config_cache)
    manifest = {k: v for k, v in manifest.items() if k != "files"}
    manifest["tensorrt"] = {**manifest["tensorrt"], "engines": built, "version": trt.__version__, "gpu": gpu}
    write_manifest(path, manifest)
    return manifest


class TensorRTBackend:
    """Runs an artifact's engines: named-tensor API, execute_async_v3 on one CUDA stream, state resident on the GPU.

    State (KV caches included) lives in device buffers and never visits the host: each call reads one buffer set
    and writes the other (ping-pong; TensorRT does not promise that an output may alias an input, so caches are
    not updated in place as in the ONNX Runtime backend, at the price of a second cache copy in GPU memory).
    Only the per-call inputs and the step's small outputs cross the PCIe bus.
    """

    def __init__(self, path: Path, manifest: dict, weights: dict[str, np.ndarray]):
        from tandemc.runtime import StateBuffers, first_state_input

        env = environment()
        if env is None:
            raise TandemcError(f"cannot run TensorRT engines here: {missing_reason()}; to run the graphs in ONNX "
                               "Runtime instead pass backend='onnxruntime' (tandemc run --backend onnxruntime)")
        trt, gpu = env
        info = manifest.get("tensorrt", {})
        if not info.get("engines"):
            raise TandemcError(f"{path} has no TensorRT engines yet; run `tandemc build-engine {path}` on this host")
        if info.get("version") != trt.__version__ or info.get("gpu") != gpu:
            raise TandemcError(f"the engines in {path} were built with TensorRT {info.get('version')} for "
                               f"{info.get('gpu')}; this host has TensorRT {trt.__version__} and {gpu}: rebuild them "
                               f"with `tandemc build-engine {path}`")
        self._cudart = _cudart()
        self._stream = _check(self._cudart.cudaStreamCreate())
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._graphs = {}
        for key, entry in manifest["graphs"].items():
            engine = runtime.deserialize_cuda_engine((path / info["engines"][key]).read_bytes())
            if engine is None:
                raise TandemcError(f"TensorRT could not load {info['engines'][key]}")
            self._graphs[key] = (engine, engine.create_execution_context(), entry)
        self._state = StateBuffers(self.zeros)
        self._first_state = {key: first_state_input(entry, caches=True) for key, entry in manifest["graphs"].items()}

    def zeros(self, shape, dtype):
        dtype = np.dtype(dtype)
        array = DeviceArray(self._cudart, tuple(shape), dtype)
        _check(self._cudart.cudaMemset(array.ptr, 0, array.nbytes))
        return array

    def call(self, key: str, inputs: list) -> list:
        _, context, entry = self._graphs[key]
        cudart = self._cudart
        index = self._first_state[key]
        which = self._state.set_to_write(inputs[index] if index is not None else None)
        uploads = []
        for spec, x in zip(entry["inputs"], inputs):
            if not isinstance(x, DeviceArray):
                host = np.ascontiguousarray(np.asarray(x, spec["dtype"]))
                x = self._state.get(f"{key}/{spec['name']}", spec, 0)
                _check(cudart.cudaMemcpyAsync(x.ptr, host.ctypes.data, host.nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream))
                uploads.append(host)  # alive until the stream synchronises
            context.set_tensor_address(spec["name"], x.ptr)
        outputs = []
        for spec in entry["outputs"]:
            source = entry["state"].get(spec["name"])
            buffer = self._state.get(source or f"{key}/{spec['name']}", spec, which)
            context.set_tensor_address(spec["name"], buffer.ptr)
            outputs.append(buffer)
        if not context.execute_async_v3(self._stream):
            raise TandemcError(f"TensorRT failed to run {key}")
        _check(cudart.cudaStreamSynchronize(self._stream))
        return [out if spec["name"] in entry["state"] else self.to_host(out)
                for spec, out in zip(entry["outputs"], outputs)]

    def to_host(self, array) -> np.ndarray:
        if not isinstance(array, DeviceArray):
            return np.asarray(array)
        host = np.empty(array.shape, array.dtype)
        _check(self._cudart.cudaMemcpyAsync(host.ctypes.data, array.ptr, array.nbytes,
                                            self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream))
        _check(self._cudart.cudaStreamSynchronize(self._stream))
        return host


class DeviceArray:
    """A device buffer with its shape and dtype, freed with the object."""

    def __init__(self, cudart, shape: tuple, dtype: np.dtype):
        self.shape, self.dtype, self._cudart = shape, dtype, cudart
        self.nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self.ptr = int(_check(cudart.cudaMalloc(max(self.nbytes, 1))))

    def __del__(self):
        self._cudart.cudaFree(self.ptr)


def manifest_extras(manifest: dict) -> dict:
    """The manifest's `tensorrt` entry at export time: the build spec, no engines yet."""
    return {"build": build_spec(manifest), "engines": {}, "version": None, "gpu": None}


