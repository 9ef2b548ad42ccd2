"""`tandemc export`: checkpoint → Program → graphs → target files → verified artifact directory.

Everything is written into a temporary directory and renamed into place only after the artifact has been loaded
back and verified against the reference, so a failed or interrupted export leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tandemc import artifact
from tandemc.atomic import atomic_directory
from tandemc.checkpoint import Checkpoint
from tandemc.errors import TandemcError
from tandemc.program import ExportOptions, Program
from tandemc.trace import build_graphs


def lower_for_target(program: Program, graphs, target: str, platforms: Sequence[str] | None,
                     weight_locations: dict[str, tuple[str, int, int]]):
    """(files, per-graph file names, manifest extras) for one target."""
    if target in ("cpu", "gpu"):
        import onnx
        import onnxruntime

        from tandemc.targets import onnx as onnx_target

        if program.options.mesh or platforms:
            raise TandemcError("--mesh and --platforms apply to the tpu target only")
        files, reads = onnx_target.lower(graphs, weight_locations, profile=target)
        names = {key: {"onnx": key + ".onnx", "weights": reads[key]} for key in reads}
        if target == "gpu":
            check_tensorrt_profile(files)
        return files, names, {"onnx_opset": onnx_target.OPSET,
                              "onnx_session_config": onnx_target.session_config(program.params),
                              "versions": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}}
    if target == "tpu":
        from tandemc.targets import stablehlo

        platforms = stablehlo.check_platforms(platforms or stablehlo.DEFAULT_PLATFORMS)
        mesh, batch = program.options.mesh, program.options.batch
        files, signatures, versions = stablehlo.lower(graphs, platforms, mesh, batch)
        names = {g.key: {"module": g.key + stablehlo.MODULE_SUFFIX, "text": g.key + ".mlir",
                         "stablehlo": signatures[g.key]} for g in graphs}
        extra = {"platforms": list(platforms), "versions": versions}
        if mesh:
            extra["mesh"] = {"axes": list(stablehlo.MESH_AXES), "shape": list(mesh)}
            for g in graphs:
                ins, outs = stablehlo.graph_partition_specs(g, mesh, batch)
                names[g.key]["sharding"] = {"inputs": [list(s) for s in ins], "outputs": [list(s) for s in outs]}
        return files, names, extra
    raise TandemcError(f"unknown target {target!r}; choose one of {', '.join(artifact.TARGETS)}")


# The dtypes each target verifies. The cpu and gpu graphs are verified in ONNX Runtime, whose CPU kernels have no
# bfloat16 Einsum or MatMul; float16 runs there, ~2.5x slower than float32 on the example (it is a GPU format:
# TensorRT takes float16 graphs as typed).
TARGET_DTYPES = {"tpu": ("float32", "bfloat16", "float16"), "cpu": ("float32", "float16"),
                 "gpu": ("float32", "float16")}


def check_dtype(target: str, dtype: str) -> None:
    if dtype not in TARGET_DTYPES[target]:
        others = [t for t, dtypes in TARGET_DTYPES.items() if dtype in dtypes]
        usable = " or ".join(TARGET_DTYPES[target])
        raise TandemcError(f"--dtype {dtype} is not available for the {target} target (ONNX Runtime, which runs and "
                           f"verifies its graphs, has no {dtype} kernels for them): use {usable}, or --target "
                           f"{' or '.join(others)} for {dtype}")


def check_tensorrt_profile(files: dict[str, bytes]) -> None:
    """Refuse to write a gpu artifact whose graphs TensorRT's parser would reject (targets/tensorrt.py)."""
    import onnx

    from tandemc.targets import tensorrt

    problems = [p for name, data in files.items() for p in tensorrt.check_model(onnx.load_from_string(data), name)]
    if problems:
        raise TandemcError(f"{len(problems)} TensorRT profile violation(s), nothing written; first: {problems[0]}")


# Text the per-pass checks decode (passes/check.py): code and prose, as a tandem's users send.
CHECK_TEXTS = ("def main(argv):\n    \"\"\"Parse the command line.\"\"\"\n    import os\n    return 0\n",
               "The compiler reads the checkpoint, traces each graph and writes the artifact to disk.\n")


def make_program(ckpt: Checkpoint, options: ExportOptions, passes=()) -> Program:
    """The checkpoint as a Program with `passes` applied (names, (name, options) pairs or a preset like "O1")."""
    from tandemc.passes import run_passes

    program = Program.make(ckpt.config, ckpt.params, options)
    return run_passes(program, passes, prompts=[ckpt.tokenizer.encode(t) for t in CHECK_TEXTS])


def export(ckpt: Checkpoint, target: str, out: str | Path, options: ExportOptions, *,
           platforms: Sequence[str] | None = None, force: bool = False, verify: bool = True,
           verify_prompts: int = 4, savedmodel: bool = False, passes=(), build_engines: bool = True) -> dict:
    """Write a verified artifact for `target` to `out`; returns its manifest. `savedmodel` (tpu target) adds a
    TensorFlow SavedModel wrapping the same StableHLO, verified like the rest; `passes` rewrite the Program first
    (tandemc.passes), and the artifact is verified against the rewritten Program's reference. The gpu target
    builds TensorRT engines too where TensorRT and a GPU are present (`build_engines`), else leaves that to
    `tandemc build-engine` on the GPU host."""
    from tandemc.runtime import load
    from tandemc.verify import summary, verify as run_verify

    if target not in artifact.TARGETS:
        raise TandemcError(f"unknown target {target!r}; choose one of {', '.join(artifact.TARGETS)}")
    options.validate(ckpt.config)
    check_dtype(target, options.dtype)
    program = make_program(ckpt, options, passes)
    if savedmodel and (target != "tpu" or options.mesh):
        raise TandemcError("--savedmodel wraps unsharded StableHLO: use it with --target tpu and no --mesh")
    tokenizer_file = (ckpt.path / ckpt.config.tokenizer.file) if ckpt.config.tokenizer.type == "hf" else None
    with atomic_directory(out, force, sources=(ckpt.path,)) as tmp:  # refusals come before any work
        graphs = build_graphs(program)
        locations = artifact.write_weights(tmp, program, graphs)
        files, names, extra = lower_for_target(program, graphs, target, platforms, locations)
        graphs = [g for g in graphs if g.key in names]
        manifest = artifact.write_files(tmp, program, graphs, files, names, target, extra, ckpt.tokenizer,
                                           tokenizer_file)
        if savedmodel:
            from tandemc.targets import savedmodel as tf_target

            tf_target.write(tmp, graphs, artifact.graph_weights(program, graphs), extra["platforms"])
            manifest["savedmodel"] = {"directory": tf_target.DIRECTORY,
                                      "signatures": {g.key: tf_target.signature_name(g.key) for g in graphs}}
        if target == "gpu":
            from tandemc.targets import tensorrt

            manifest["tensorrt"] = tensorrt.manifest_extras(manifest)
        manifest = artifact.write_manifest(tmp, manifest)  # hashes the files once; loading for verify needs them
        if verify:  # gpu graphs are verified in ONNX Runtime; their engines, where built, by gpu_check.sh
            backend = "onnxruntime" if target == "gpu" else None
            manifest["verification"] = report = run_verify(load(tmp, backend), program, prompts=verify_prompts)
            if savedmodel:
                manifest["verification_savedmodel"] = tf_report = run_verify(load(tmp, backend="savedmodel"), program,
                                                                             prompts=verify_prompts)
                report = {**tf_report, "ok": report["ok"] and tf_report["ok"]}
            if not report["ok"]:
                raise TandemcError(f"verification failed, nothing written: {summary(report)}; rerun with "
                                   "--no-verify to keep the artifact for inspection")
            manifest = artifact.write_manifest(tmp, manifest)
        if target == "gpu" and build_engines:
            from tandemc.targets import tensorrt

            if tensorrt.environment() is not None:
                manifest = tensorrt.build_engines(tmp)
    return manifest
