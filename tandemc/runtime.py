"""Loading and running artifacts: `load(path).generate(prompts, ...)`.

A runtime needs only the manifest: it calls `prefill` per prompt chunk and `step` until every row is done,
feeding each graph's state outputs back as the next call's state inputs, exactly as the manifest wires them
(docs/artifact.md). Backends differ only in how they call one graph; the loop is `decoding.decode_loop`, the
same one the JAX reference uses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tandemc import safetensors_io
from tandemc.artifact import block_lengths, manifest_config, read_manifest
from tandemc.decoding import Generation, Stats, check_prompts, decode_loop, pad_prompts
from tandemc.errors import TandemcError
from tandemc.sampling import check_sampling, uniforms
from tandemc.schedule import StepTimes, make as make_schedule
from tandemc.tokenizer import load_tokenizer
from tandemc.trace import step_graph_name


def check_signature(file: Path, entry: dict, inputs: list, outputs: list) -> None:
    """A graph file's own (name, shape) inputs and outputs must be the manifest entry's: a manifest edited to
    describe other graphs is refused before any call."""
    for side, actual in (("inputs", inputs), ("outputs", outputs)):
        expected = [(spec["name"], list(spec["shape"])) for spec in entry[side]]
        if [(name, list(shape)) for name, shape in actual] != expected:
            raise TandemcError(f"{file}: its {side} are not the ones its manifest entry lists; the manifest does "
                               "not describe this graph: re-export the artifact")


def named_shapes(specs: list, avals) -> list:
    """A jax.export module's argument or result shapes under the entry's names (the module has none); a different
    count matches nothing."""
    return [(spec["name"], aval.shape) for spec, aval in zip(specs, avals)] if len(specs) == len(avals) else []


class StableHLOBackend:
    """Serialized jax.export modules, called through JAX on this host's platform."""

    def __init__(self, path: Path, manifest: dict, weights: dict[str, np.ndarray]):
        import jax
        from jax import export

        self._jax = jax
        platform = jax.default_backend()
        self._fns, self._weights = {}, {}
        mesh = None
        if "mesh" in manifest:
            from tandemc.targets.stablehlo import make_mesh

            mesh = make_mesh(tuple(manifest["mesh"]["shape"]))
        device_weights = {} if mesh else {name: jax.device_put(array) for name, array in weights.items()}
        for key, entry in manifest["graphs"].items():
            try:
                exported = export.deserialize(bytearray((path / entry["module"]).read_bytes()))
            except Exception as e:  # flatbuffer or StableHLO errors: the file is not a module jax can read
                raise TandemcError(f"{path / entry['module']} is not a readable jax.export module "
                                   f"({e.__class__.__name__}); re-export") from None
            check_signature(path / entry["module"], entry,
                            named_shapes(entry["inputs"], exported.in_avals[len(entry["weights"]):]),
                            named_shapes(entry["outputs"], exported.out_avals))
            if platform not in exported.platforms:
                raise TandemcError(f"graph {key} was exported for {', '.join(exported.platforms)}; this host runs "
                                   f"{platform}: re-export with --platforms including {platform}")
            n_weights = len(entry["weights"])
            n_state = len(entry["state"])
            donate = tuple(range(n_weights, n_weights + n_state))  # the caches are updated in place
            placement = {}
            if mesh:
                from jax.sharding import NamedSharding, PartitionSpec

                ins, outs = ([NamedSharding(mesh, PartitionSpec(*spec)) for spec in specs]
                             for specs in (entry["sharding"]["inputs"], entry["sharding"]["outputs"]))
                placement = {"in_shardings": tuple(ins), "out_shardings": tuple(outs)}
                for name, sharding in zip(entry["weights"], ins):
                    device_weights.setdefault(name, jax.device_put(weights[name], sharding))
            self._fns[key] = jax.jit(exported.call, donate_argnums=donate, **placement)
            self._weights[key] = [device_weights[name] for name in entry["weights"]]

    def call(self, key: str, inputs: list) -> list:
        return list(self._fns[key](*self._weights[key], *inputs))

    def zeros(self, shape, dtype):
        """A state buffer owned by the runtime: donated state must not alias memory numpy may free."""
        return self._jax.numpy.zeros(shape, dtype)

    def to_host(self, array) -> np.ndarray:
        return np.array(array)  # a copy: the device buffer may be donated to the next call


class SavedModelBackend:
    """The artifact's TensorFlow SavedModel (`export --savedmodel`), one signature per graph."""

    def __init__(self, path: Path, manifest: dict, weights: dict[str, np.ndarray]):
        from tandemc.targets import savedmodel

        if "savedmodel" not in manifest:
            raise TandemcError(f"{path} has no SavedModel; export it with --savedmodel")
        tf = savedmodel.import_tensorflow()
        self._tf, self._names = tf, savedmodel.tensor_name
        loaded = tf.saved_model.load(str(path / manifest["savedmodel"]["directory"]))
        self._loaded = loaded  # keeps the variables alive
        self._graphs = {key: (loaded.signatures[sig], manifest["graphs"][key])
                        for key, sig in manifest["savedmodel"]["signatures"].items()}

    def call(self, key: str, inputs: list) -> list:
        fn, entry = self._graphs[key]
        tf = self._tf
        outputs = fn(**{self._names(spec["name"]): x if isinstance(x, tf.Tensor) else tf.constant(x)
                        for spec, x in zip(entry["inputs"], inputs)})
        return [outputs[self._names(o["name"])] for o in entry["outputs"]]

    def zeros(self, shape, dtype):
        return self._tf.zeros(shape, dtype)

    def to_host(self, array) -> np.ndarray:
        return array.numpy()


class IreeBackend:
    """The tpu artifact's StableHLO text (`.mlir`) compiled by IREE for this host's CPU and run by IREE's runtime: a
    runtime with neither JAX nor XLA (`pip install iree-base-compiler iree-base-runtime`). Each graph is compiled
    on its first call, so a host loop never compiles `generate`. The modules' arguments are the platform index
    (where they serve several platforms) and their `kept_arguments` (docs/artifact.md)."""

    def __init__(self, path: Path, manifest: dict, weights: dict[str, np.ndarray]):
        try:
            import iree.compiler.tools as compiler
            import iree.runtime as ireert
        except ImportError:
            raise TandemcError("the iree backend needs IREE: pip install 'tandemc[iree]'") from None
        if manifest["target"] != "tpu" or "mesh" in manifest or "cpu" not in manifest.get("platforms", ()):
            raise TandemcError("the iree backend runs tpu-target artifacts exported for the cpu platform without "
                               "--mesh; re-export with --platforms including cpu")
        self._compiler, self._rt, self._path, self._manifest = compiler, ireert, path, manifest
        self._config = ireert.Config("local-task")
        self._weights = {name: ireert.asdevicearray(self._config.device, array) for name, array in weights.items()}
        self._fns: dict[str, tuple] = {}

    def _compile(self, key: str):
        entry = self._manifest["graphs"][key]
        signature = entry["stablehlo"]
        try:
            vmfb = self._compiler.compile_file(str(self._path / entry["text"]), input_type="stablehlo",
                                               target_backends=["llvm-cpu"],
                                               extra_args=["--iree-llvmcpu-target-cpu=host"])
        except self._compiler.CompilerToolError as e:
            first = next((line for line in str(e).splitlines() if "error:" in line), str(e).splitlines()[0])
            raise TandemcError(f"IREE cannot compile graph {key}: {first.strip()}") from None
        context = self._rt.SystemContext(config=self._config)
        module = self._rt.VmModule.copy_buffer(context.instance, vmfb)
        context.add_vm_module(module)
        fn = getattr(context.modules, module.name)["main"]
        prefix = [np.int32(self._manifest["platforms"].index("cpu"))] if signature["platform_index_argument"] else []
        names = list(entry["weights"]) + [spec["name"] for spec in entry["inputs"]]
        kept = [names.index(name) for name in signature["kept_arguments"]]
        return context, fn, prefix, [self._weights[n] for n in entry["weights"]], kept

    def call(self, key: str, inputs: list) -> list:
        if key not in self._fns:
            self._fns[key] = self._compile(key)
        _, fn, prefix, weights, kept = self._fns[key]
        args = weights + list(inputs)
        outputs = fn(*prefix, *(args[i] for i in kept))
        return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype)

    def to_host(self, array) -> np.ndarray:
        return np.asarray(array.to_host() if hasattr(array, "to_host") else array)


class StateBuffers:
    """Preallocated state buffers in two sets, keyed by (name, shape, dtype) and so shared by the graphs of a cache
    bucket: a call reads its state from one set and writes the other (ping-pong). `allocate(shape, dtype)` makes
    a backend's buffer."""

    def __init__(self, allocate):
        self._allocate = allocate
        self._buffers: dict[tuple, object] = {}
        self._set_of: dict[int, int] = {}  # id(buffer) → its set

    def get(self, name: str, spec: dict, which: int):
        key = (name, tuple(spec["shape"]), spec["dtype"], which)
        if key not in self._buffers:
            self._buffers[key] = buffer = self._allocate(spec["shape"], spec["dtype"])
            self._set_of[id(buffer)] = which
        return self._buffers[key]

    def set_to_write(self, state) -> int:
        """The set a call reading `state` writes: the other one (set 0 for state allocated elsewhere)."""
        return 1 - self._set_of.get(id(state), 1)


def first_state_input(entry: dict, caches: bool) -> int | None:
    """Index of a graph's first state input (KV caches, rank 4, count only when `caches`), or None."""
    feeds = set(entry["state"].values())
    return next((i for i, spec in enumerate(entry["inputs"])
                 if spec["name"] in feeds and (caches or len(spec["shape"]) != 4)), None)


def check_external_data(graph_file: Path, weights_file: str) -> None:
    """Every external initializer of an ONNX graph (its subgraphs' too) must read the artifact's own weights file,
    within its size: ONNX Runtime would otherwise follow a `location` anywhere on disk."""
    import onnx

    try:
        model = onnx.load(graph_file, load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: the file is not a readable ONNX model
        raise TandemcError(f"{graph_file} is not a readable ONNX graph ({e.__class__.__name__}); re-export") from None
    size = (graph_file.parent / weights_file).stat().st_size

    def tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    yield from tensors(attribute.g)

    for tensor in tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        try:
            end = int(info.get("offset", 0)) + int(info["length"])
        except (KeyError, ValueError):
            end = -1
        if info.get("location") != weights_file or not 0 <= end <= size:
            raise TandemcError(f"{graph_file}: initializer '{tensor.name}' reads external data "
                               f"{info.get('location')!r} outside the artifact's {weights_file}; re-export")


class OnnxBackend:
    """One ONNX Runtime session per graph; weights come from the shared external-data file.

    Nothing is allocated or copied per call beyond the step's small outputs. Every output is bound once to a
    preallocated buffer: a KV cache output to the buffer of the cache input it replaces (the manifest's wiring),
    so the cache write lands in place (the cache write is the only reader of its input, tests check token
    identity, which any aliasing mistake would break); the other state outputs to one of two buffer sets, the
    one the call's state inputs do not live in (ping-pong), shared by the graphs of a cache bucket. Bindings
    are kept per (graph, set) and only the per-call inputs (uniforms, controls, prompt chunks) are rebound.
    State returned by a call stays valid until the call after next; the caller's loop only keeps the latest.
    Where the artifact has step graphs at several block lengths, each session's threads stop spinning at the end
    of its run: left spinning, they take the two cores from the next step's session (measured on SmolLM2-135M:
    a step at γ = 0 or 1 right after one at γ = 2 took twice its time).
    """

    def __init__(self, path: Path, manifest: dict, weights: dict[str, np.ndarray], threads: int = 0,
                 profile: Path | None = None):
        import onnxruntime as ort

        self._ort = ort

        switching = len(block_lengths(manifest["decode"])) > 1  # a schedule calls several step graphs in turn

        def session(key, entry):
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            if switching:  # stop the pool's spinning after each run, or it steals the cores from the next graph's
                options.add_session_config_entry("session.force_spinning_stop", "1")
            for name, value in manifest.get("onnx_session_config", {}).items():
                options.add_session_config_entry(name, value)
            if profile is not None:  # ONNX Runtime's own trace, one file per graph (end_profiling writes it)
                options.enable_profiling = True
                options.profile_file_prefix = str(Path(profile) / key)
            check_external_data(path / entry["onnx"], manifest["weights_file"])
            try:
                session = ort.InferenceSession(str(path / entry["onnx"]), options, providers=["CPUExecutionProvider"])
            except Exception as e:  # ONNX Runtime's Fail/InvalidGraph/...: one line naming the file
                first = str(e).splitlines()[0][:300] if str(e) else e.__class__.__name__
                raise TandemcError(f"ONNX Runtime cannot load {path / entry['onnx']}: {first}") from None
            check_signature(path / entry["onnx"], entry, [(i.name, i.shape) for i in session.get_inputs()],
                            [(o.name, o.shape) for o in session.get_outputs()])
            return session

        if profile is not None:
            Path(profile).mkdir(parents=True, exist_ok=True)
        self._graphs, self._new_session = manifest["graphs"], session
        # The step loop's graphs open now; `generate` (one call per request, rarely used) on first use: each
        # session holds its own prepacked copy of the weights (SmolLM2-135M: ~0.55 GB).
        self._sessions: dict[str, tuple] = {}
        for key, entry in manifest["graphs"].items():
            if entry["name"] != "generate":
                self._open(key)
        self._state = StateBuffers(self.zeros)
        self._first_state = {key: first_state_input(entry, caches=False) for key, entry in manifest["graphs"].items()}
        self._bindings: dict[tuple, tuple] = {}  # (graph, set) → what _plan returns

    def _plan(self, key: str, which: int):
        """The binding of graph `key` writing buffer set `which`, and how to return each output."""
        session, entry = self._open(key)
        binding = session.io_binding()
        returns = []  # per output: ("copy", OrtValue) | ("state", OrtValue) | ("cache", its input's name)
        for spec in entry["outputs"]:
            source = entry["state"].get(spec["name"])
            if source is not None and len(spec["shape"]) == 4:
                returns.append(("cache", source))
                continue
            value = self._state.get(source if source is not None else f"{key}/{spec['name']}", spec, which)
            binding.bind_ortvalue_output(spec["name"], value)
            returns.append(("copy" if source is None else "state", value))
        cache_output = {source: name for name, source in entry["state"].items()}
        inputs = [(spec["name"], spec["name"] in cache_output, len(spec["shape"]) == 4, cache_output.get(spec["name"]))
                  for spec in entry["inputs"]]
        return session, binding, {}, inputs, returns

    def call(self, key: str, inputs: list) -> list:
        index = self._first_state[key]
        which = self._state.set_to_write(inputs[index] if index is not None else None)
        if (key, which) not in self._bindings:
            self._bindings[key, which] = self._plan(key, which)
        session, binding, bound, plan, returns = self._bindings[key, which]
        for (name, is_state, is_cache, cache_out), x in zip(plan, inputs):
            if name in bound and bound[name][0] is x:  # bound last time (OrtValues, numpy arrays: no copies)
                continue
            if is_state:
                value = x if isinstance(x, self._ort.OrtValue) else self._ort.OrtValue.ortvalue_from_numpy(
                    np.ascontiguousarray(x))
                binding.bind_ortvalue_input(name, value)
                if is_cache:  # the cache write lands in the input's buffer
                    binding.bind_ortvalue_output(cache_out, value)
            else:
                value = np.ascontiguousarray(np.asarray(x))
                binding.bind_cpu_input(name, value)
            bound[name] = (x, value)
        session.run_with_iobinding(binding)
        return [value.numpy().copy() if kind == "copy" else bound[value][1] if kind == "cache" else value
                for kind, value in returns]

    def _open(self, key: str) -> tuple:
        """(session, manifest entry) of graph `key`, opened on first use."""
        if key not in self._sessions:
            self._sessions[key] = (self._new_session(key, self._graphs[key]), self._graphs[key])
        return self._sessions[key]

    def prepare(self, keys) -> None:
        """Open the sessions of graphs `keys` now, so that no timed call pays for it."""
        for key in keys:
            self._open(key)

    def end_profiling(self) -> dict[str, Path]:
        """Stop ONNX Runtime's profiler (sessions opened with `profile`); the trace file of each graph that ran."""
        files = {key: Path(session.end_profiling()) for key, (session, _) in self._sessions.items()}
        return {key: f for key, f in files.items() if f.name}

    def zeros(self, shape, dtype):
        return self._ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype))  # keeps its numpy buffer alive

    def to_host(self, array) -> np.ndarray:
        return array.numpy() if isinstance(array, self._ort.OrtValue) else np.asarray(array)


def _tensorrt_backend(path: Path, manifest: dict, weights: dict):
    from tandemc.targets.tensorrt import TensorRTBackend

    return TensorRTBackend(path, manifest, weights)


# By artifact target (the default) or by name: `savedmodel` runs a tpu artifact's SavedModel, `iree` its StableHLO
# compiled by IREE, `onnxruntime` a gpu artifact's TensorRT-profile ONNX graphs (how they are verified where
# TensorRT is absent).
BACKENDS = {"tpu": StableHLOBackend, "savedmodel": SavedModelBackend, "iree": IreeBackend, "cpu": OnnxBackend,
            "onnxruntime": OnnxBackend,
            "gpu": _tensorrt_backend}


@dataclass
class Result:
    tokens: list[list[int]]
    text: list[str]
    stats: dict


class Artifact:
    """A loaded artifact: its manifest, config, tokenizer and one backend."""

    def __init__(self, path: str | Path, backend: str | None = None, threads: int = 0, profile: Path | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.config = manifest_config(self.manifest)
        self.decode = self.manifest["decode"]
        self.tokenizer = load_tokenizer(self.config.tokenizer, self.path)
        weights = safetensors_io.read(self.path / self.manifest["weights_file"])
        backend = backend or self.manifest["target"]
        if backend not in BACKENDS:
            raise TandemcError(f"no runtime backend {backend!r} in this tandemc; choose one of {', '.join(BACKENDS)}")
        options = {"threads": threads, "profile": profile} if BACKENDS[backend] is OnnxBackend else {}
        if profile is not None and not options:
            raise TandemcError(f"profiling uses ONNX Runtime's profiler: the {backend} backend has none; profile a "
                               "cpu artifact, or a gpu artifact with --backend onnxruntime")
        runs = {"tpu": ("tpu", "savedmodel", "iree"), "cpu": ("cpu", "onnxruntime"), "gpu": ("gpu", "onnxruntime")}
        if backend not in runs[self.manifest["target"]]:
            raise TandemcError(f"the {backend} backend does not run {self.manifest['target']} artifacts; use one of "
                               f"{', '.join(runs[self.manifest['target']])}")
        self.backend = BACKENDS[backend](self.path, self.manifest, weights, **options)
        self._step_times: dict[int, StepTimes] = {}  # per cache length: what a step at each γ takes here

    # --- one request of up to `batch` prompts --------------------------------------------------------------

    def bucket(self, longest_prompt: int, max_new_tokens: int) -> int:
        """The smallest cache length that fits the prompt and its new tokens."""
        need = longest_prompt + max_new_tokens
        for seq_len in self.decode["cache_buckets"]:
            if need <= seq_len:
                return seq_len
        raise TandemcError(f"prompt of {longest_prompt} tokens + {max_new_tokens} new tokens = {need} exceeds the "
                           f"artifact's largest cache length {self.decode['cache_buckets'][-1]}; shorten the prompt "
                           "or re-export with a larger --max-seq-len")

    @property
    def has_generate_graph(self) -> bool:
        return any(g["name"] == "generate" for g in self.manifest["graphs"].values())

    def _graph(self, name: str, seq_len: int) -> tuple[str, dict]:
        key = f"{name}.s{seq_len}"
        return key, self.manifest["graphs"][key]

    def _controls(self, temperature, top_k, top_p, eos_id) -> list[np.ndarray]:
        return [np.float32(temperature), np.int32(top_k), np.float32(top_p), np.int32(eos_id)]

    @property
    def block_lengths(self) -> list[int]:
        """The block lengths this artifact has step graphs for (`export --block-lengths`)."""
        return block_lengths(self.decode)

    def run_steps(self, prompts: list[list[int]], max_new_tokens: int, temperature=0.0, top_k=0, top_p=1.0,
                  seed=0, eos_id=-1, record_logits=False, block_length=None) -> Generation:
        """Host-driven loop over the `prefill` and `step` graphs (one batch of up to `batch` prompts).
        `block_length`: None or "auto" (the measured schedule where the artifact has several step graphs, else
        its one), one of `block_lengths`, or a schedule object (tandemc.schedule)."""
        seq_len = self.bucket(max(len(p) for p in prompts), max_new_tokens)
        schedule = make_schedule(block_length, self.block_lengths, self.decode["block_length"],
                                 self._step_times.setdefault(seq_len, StepTimes()))
        controls = self._controls(temperature, top_k, top_p, eos_id)
        prefill_key, prefill = self._graph("prefill", seq_len)
        steps = {g: self._graph(step_graph_name(g, self.decode["block_length"]), seq_len) for g in schedule.gammas}
        # State travels as {input name: array}; every state input starts as zeros (docs/artifact.md).
        backend = self.backend
        state = {spec["name"]: backend.zeros(spec["shape"], spec["dtype"]) for spec in prefill["inputs"]
                 if spec["name"] in prefill["state"].values()}

        names = {key: ([spec["name"] for spec in entry["inputs"] if spec["name"] in state],
                       [(o["name"], entry["state"].get(o["name"])) for o in entry["outputs"]])
                 for key, entry in ((prefill_key, prefill), *steps.values())}

        def call(key, entry, state, inputs):
            state_names, output_names = names[key]
            new_state, outputs = {}, {}
            for (name, feeds), value in zip(output_names, backend.call(key, [*map(state.get, state_names), *inputs])):
                if feeds is None:
                    outputs[name] = value
                else:
                    new_state[feeds] = value
            return new_state, outputs

        def prefill_call(state, tokens, start, lengths, limit, u):
            return call(prefill_key, prefill, state, [tokens, start, lengths, limit, u, *controls])[0]

        def step_call(state, u, gamma):
            new_state, outputs = call(*steps[gamma], state, [u, *controls])
            return new_state, {k: backend.to_host(v) for k, v in outputs.items()}

        return decode_loop(prefill_call, step_call, state, prompts, batch=self.decode["batch"],
                           chunk=self.decode["prefill_chunk"], schedule=schedule,
                           max_new_tokens=max_new_tokens, seed=seed, eos_id=eos_id, greedy=temperature == 0,
                           record_logits=record_logits,
                           read=lambda state, name: backend.to_host(state["state." + name]))

    def run_generate(self, prompts: list[list[int]], max_new_tokens: int, temperature=0.0, top_k=0, top_p=1.0,
                     seed=0, eos_id=-1) -> Generation:
        """One call of the in-graph `generate` loop (one batch of up to `batch` prompts)."""
        if max_new_tokens > self.decode["max_new_tokens"]:
            raise TandemcError(f"max_new_tokens {max_new_tokens} exceeds the generate graph's "
                               f"{self.decode['max_new_tokens']}; use the step loop or re-export with a larger "
                               "--max-new-tokens")
        seq_len = self.bucket(max(len(p) for p in prompts), max_new_tokens)
        if f"generate.s{seq_len}" not in self.manifest["graphs"]:
            raise TandemcError(f"this {self.manifest['target']} artifact has no generate graph; use the step loop")
        key, entry = self._graph("generate", seq_len)
        specs = {s["name"]: s for s in entry["inputs"]}
        batch, width = specs["tokens"]["shape"]
        n_steps, _, u_width = specs["u_steps"]["shape"]
        tokens, lengths, limit = pad_prompts(prompts, batch, width, max_new_tokens)
        u_steps = np.stack([uniforms(seed, call, batch, u_width) for call in range(1, n_steps + 1)])
        outputs = self.backend.call(key, [tokens, lengths, limit, uniforms(seed, 0, batch, 1), u_steps]
                                    + self._controls(temperature, top_k, top_p, eos_id))
        named = {o["name"]: self.backend.to_host(v) for o, v in zip(entry["outputs"], outputs)}
        n = len(prompts)
        out = [named["new_tokens"][i, :named["n_tokens"][i]].tolist() for i in range(n)]
        stats = Stats(steps=int(named["steps"][:n].max(initial=0)), row_steps=int(named["steps"][:n].sum()),
                      drafted=int(named["drafted"][:n].sum()), accepted=int(named["accepted"][:n].sum()),
                      new_tokens=sum(len(r) for r in out))
        return Generation(out, stats.as_dict())

    # --- the user-facing call --------------------------------------------------------------------------------

    def generate(self, prompts: list[str] | list[list[int]], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, use_generate_graph: bool = False,
                 block_length=None) -> Result:
        """Text or token-id prompts → tokens, text and statistics; batches of the artifact's batch size.
        `block_length` (host-driven steps): see `run_steps`; the generate graph runs the default γ only."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        check_prompts(ids, max_new_tokens)
        check_sampling(temperature, top_k, top_p)
        if use_generate_graph:
            if block_length not in (None, self.decode["block_length"]):
                raise TandemcError(f"the generate graph runs block length {self.decode['block_length']} only; "
                                   "drop --generate-graph to choose the block length")
            if hasattr(self.backend, "prepare"):
                self.backend.prepare(k for k, g in self.manifest["graphs"].items() if g["name"] == "generate")
            run = self.run_generate
        else:
            make_schedule(block_length, self.block_lengths, self.decode["block_length"])  # refused before any work

            def run(*args):
                return self.run_steps(*args, block_length=block_length)
        batch = self.decode["batch"]
        tokens, total, steps_at = [], Stats(), {}
        start = time.perf_counter()
        for first in range(0, len(ids), batch):
            result = run(ids[first:first + batch], max_new_tokens, temperature, top_k, top_p, seed,
                         self.tokenizer.eos_id)
            tokens += result.tokens
            total = total + Stats(**{k: result.stats[k] for k in ("steps", "row_steps", "drafted", "accepted",
                                                                   "new_tokens")})
            for gamma in result.block_lengths:
                steps_at[gamma] = steps_at.get(gamma, 0) + 1
        seconds = time.perf_counter() - start
        stats = {**total.as_dict(), "seconds": round(seconds, 4),
                 "tokens_per_second": round(total.new_tokens / seconds, 2) if seconds > 0 else 0.0}
        if len(self.block_lengths) > 1:
            stats["steps_by_block_length"] = {str(g): steps_at[g] for g in sorted(steps_at)}
        return Result(tokens, [self.tokenizer.decode(t) for t in tokens], stats)


def load(path: str | Path, backend: str | None = None, threads: int = 0, profile: str | Path | None = None) -> Artifact:
    """Open an artifact directory: manifest, hashes and schema checked before anything runs. `backend` defaults to
    the artifact's target; `savedmodel` runs a tpu artifact's TensorFlow SavedModel instead. `threads`: ONNX
    Runtime intra-op threads for cpu artifacts (0: one per core). `profile`: a folder for ONNX Runtime's
    profiler traces (ONNX backends; `artifact.backend.end_profiling()` writes them, tandemc.profiling reads them)."""
    return Artifact(path, backend, threads, None if profile is None else Path(profile))
