"""The GPU target: TensorRT-profile ONNX graphs (checked, run token-identical in ONNX Runtime), the profile checker
against graphs that violate it, and the TensorRT engine path, which runs only where TensorRT and a GPU exist."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from tandemc.checkpoint import Checkpoint, load_checkpoint
from tandemc.config import TandemConfig
from tandemc.cli import cli
from tandemc.export import export
from tandemc.params import init_params
from tandemc.program import ExportOptions
from tandemc.runtime import load
from tandemc.targets import tensorrt
from tandemc.tokenizer import ByteTokenizer

from conftest import CONFIGS, decoder
from test_export import EXAMPLE

# Wider than TensorRT's TopK (K ≤ 3840), as every real vocabulary is: sampling must not sort it.
WIDE_VOCAB = TandemConfig(decoder(5000, 32, 1, 4, 2, 8, tie=True), decoder(5000, 16, 1, 2, 2, 8, tie=True))


def tiny(name):
    cfg = (WIDE_VOCAB if name == "wide-vocab" else CONFIGS[name]).validate()
    return Checkpoint(cfg, init_params(cfg, 1), ByteTokenizer())


@pytest.mark.parametrize("name, batch, gamma, passes", [
    pytest.param("gqa-4to2", 4, 3, "O1", marks=pytest.mark.slow), ("mha-odd-heads", 1, 1, "O0"),
    pytest.param("gqa-4to2", 2, 2, "O1,quantize_int8", marks=pytest.mark.slow), ("gqa-4to2", 1, 4, "O1,quantize_int4"),
    ("wide-vocab", 1, 2, "O1"), ("shared-table", 2, 3, "O1"),
])
def test_gpu_graphs_satisfy_the_profile_and_match_the_reference(name, batch, gamma, passes, tmp_path):
    """Greedy and fixed-seed sampled tokens identical to the reference (export's verification, in ONNX Runtime),
    no contrib operators, loop-free, and the manifest carries the engine build spec for every graph."""
    manifest = export(tiny(name), "gpu", tmp_path / "a", ExportOptions(block_length=gamma, max_seq_len=(40,),
                      batch=batch, prefill_chunk=8, max_new_tokens=8), passes=passes, verify_prompts=3)
    report = manifest["verification"]
    assert report["ok"] and report["greedy_identical"] and report["sampled_identical"], report
    assert all(not problems for problems in tensorrt.check_artifact(tmp_path / "a").values())
    spec = manifest["tensorrt"]["build"]
    assert set(spec["engines"]) == set(manifest["graphs"]) and spec["network_flags"] == ["STRONGLY_TYPED"]
    assert manifest["tensorrt"]["engines"] == {} or tensorrt.environment() is not None
    for entry in manifest["graphs"].values():
        model = onnx.load(str(tmp_path / "a" / entry["onnx"]), load_external_data=False)
        assert {o.domain for o in model.opset_import} <= {""}
        assert not tensorrt.check_model(model)  # no TopK over the vocabulary, among the rest
        if "quantize" in passes:
            dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
            assert dq and all(len(n.input) == 2 for n in dq)  # symmetric: no zero point


@pytest.mark.slow
def test_bundled_example_gpu_artifact_runs_in_onnx_runtime(tmp_path):
    ckpt = load_checkpoint(EXAMPLE)
    export(ckpt, "gpu", tmp_path / "a", ExportOptions(block_length=4, max_seq_len=(128,), batch=1,
                                                      prefill_chunk=32, max_new_tokens=32), passes="O1")
    result = CliRunner().invoke(cli, ["check", "--target", "gpu", str(tmp_path / "a"), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["ok"]
    artifact = load(tmp_path / "a", backend="onnxruntime")
    cpu = tmp_path / "cpu"
    export(ckpt, "cpu", cpu, ExportOptions(block_length=4, max_seq_len=(128,), batch=1, prefill_chunk=32,
                                           max_new_tokens=32), passes="O1", verify=False)
    prompt = "def main(argv):\n    "
    assert artifact.generate([prompt], 32).tokens == load(cpu).generate([prompt], 32).tokens


def model_with(nodes, inputs, outputs, initializers=(), opset=23, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=imports, ir_version=10)


def vi(name, dtype=TensorProto.FLOAT, shape=(2, 3)):
    return helper.make_tensor_value_info(name, dtype, list(shape))


@pytest.mark.parametrize("case, message", [
    ("contrib", "domain 'com.microsoft' is not parsed by TensorRT"),
    ("loop", "prefill and step graphs must be loop-free"),
    ("unsupported", "(NonZero): not in TensorRT's ONNX operator set"),
    ("float64", "has type DOUBLE"),
    ("opset", "opset 26 is newer than TensorRT's parser takes (25)"),
    ("topk", "K = 5000 exceeds TensorRT's 3840"),
    ("zero-point", "zero point must be a constant 0"),
    ("ragged-blocks", "blocks that divide the axis (40 rows, blocks of 16)"),
    ("cast", "casts to UINT64"),
    ("inside-if", "then_branch: node 0 'y_then' (NonZero)"),
])
def test_checker_names_each_violation(case, message):
    x, y = vi("x"), vi("y")
    if case == "contrib":
        model = model_with([helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft", name="gelu")], [x], [y],
                           domains=["com.microsoft"])
    elif case == "loop":
        body = helper.make_graph([helper.make_node("Identity", ["c"], ["c_out"])], "body",
                                 [vi("i", TensorProto.INT64, ()), vi("c", TensorProto.BOOL, ())],
                                 [vi("c_out", TensorProto.BOOL, ())])
        model = model_with([helper.make_node("Loop", ["n", "cond"], [], body=body, name="loop")],
                           [vi("n", TensorProto.INT64, ()), vi("cond", TensorProto.BOOL, ())], [])
    elif case == "unsupported":
        model = model_with([helper.make_node("NonZero", ["x"], ["y"], name="nz")], [x],
                           [vi("y", TensorProto.INT64, (2, 6))])
    elif case == "float64":
        model = model_with([helper.make_node("Identity", ["x"], ["y"])], [vi("x", TensorProto.DOUBLE)],
                           [vi("y", TensorProto.DOUBLE)])
    elif case == "opset":
        model = model_with([helper.make_node("Identity", ["x"], ["y"])], [x], [y], opset=26)
    elif case == "topk":
        k = numpy_helper.from_array(np.array([5000], np.int64), "k")
        model = model_with([helper.make_node("TopK", ["x", "k"], ["y", "i"], name="topk")], [vi("x", shape=(1, 6000))],
                           [vi("y", shape=(1, 5000))], [k])
    elif case == "zero-point":
        q = numpy_helper.from_array(np.ones((2, 3), np.int8), "q")
        s = numpy_helper.from_array(np.ones((3,), np.float32), "s")
        z = numpy_helper.from_array(np.full((3,), 3, np.int8), "z")
        model = model_with([helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1, name="dq")], [], [y],
                           [q, s, z])
    elif case == "ragged-blocks":  # valid ONNX (the last block is shorter), which TensorRT does not take
        q = numpy_helper.from_array(np.ones((40, 3), np.int8), "q")
        s = numpy_helper.from_array(np.ones((3, 3), np.float32), "s")
        model = model_with([helper.make_node("DequantizeLinear", ["q", "s"], ["y"], axis=0, block_size=16,
                                             name="dq")], [], [vi("y", shape=(40, 3))], [q, s])
    elif case == "cast":
        model = model_with([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.UINT64, name="cast")], [x],
                           [vi("y", TensorProto.UINT64)])
    else:
        then = helper.make_graph([helper.make_node("NonZero", ["x"], ["y_then"])], "then", [],
                                 [vi("y_then", TensorProto.INT64, (2, 6))])
        other = helper.make_graph([helper.make_node("NonZero", ["x"], ["y_else"])], "else", [],
                                  [vi("y_else", TensorProto.INT64, (2, 6))])
        model = model_with([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other, name="if")],
                           [x, vi("c", TensorProto.BOOL, ())], [vi("y", TensorProto.INT64, (2, 6))])
    problems = tensorrt.check_model(model, "step.s64.onnx")
    assert any(message in p for p in problems), problems
    assert all(p.startswith("step.s64.onnx: ") for p in problems)


def test_without_tensorrt_export_says_where_engines_come_from_and_build_engine_refuses(tiny_checkpoint, tmp_path):
    if tensorrt.environment() is not None:
        pytest.skip("TensorRT and a GPU are present: engines are built at export")
    runner = CliRunner()
    out = tmp_path / "a"
    result = runner.invoke(cli, ["export", str(tiny_checkpoint), "--target", "gpu", "-o", str(out), "--max-seq-len",
                                 "32", "--prefill-chunk", "8", "--max-new-tokens", "8", "--verify-prompts", "1"])
    assert result.exit_code == 0, result.output
    assert f"TensorRT engines will be built on the GPU host: tandemc build-engine {out}" in result.output
    result = runner.invoke(cli, ["build-engine", str(out)])
    assert result.exit_code == 2 and "cannot build TensorRT engines here" in result.output
    result = runner.invoke(cli, ["run", str(out), "--prompt", "hi", "-n", "4"])
    assert result.exit_code == 2 and "--backend onnxruntime" in result.output
    result = runner.invoke(cli, ["run", str(out), "--prompt", "hi", "-n", "4", "--backend", "onnxruntime"])
    assert result.exit_code == 0, result.output


# --- on a GPU host with TensorRT (skipped elsewhere, with the reason) ------------------------------------------

needs_tensorrt = pytest.mark.skipif(tensorrt.environment() is None,
                                    reason=f"TensorRT engines need a GPU host: {tensorrt.missing_reason()}")


@needs_tensorrt
def test_engines_build_and_generate_the_reference_tokens(tmp_path):
    from tandemc.decoding import generate
    import jax

    ckpt = load_checkpoint(EXAMPLE)
    options = ExportOptions(block_length=4, max_seq_len=(128,), batch=1, prefill_chunk=32, max_new_tokens=32)
    manifest = export(ckpt, "gpu", tmp_path / "a", options, passes="O1")
    info = manifest["tensorrt"]
    assert set(info["engines"]) == set(manifest["graphs"]) and info["version"] and info["gpu"]
    artifact = load(tmp_path / "a")
    prompt = ckpt.tokenizer.encode("def main(argv):\n    ")
    params = jax.tree.map(jax.numpy.asarray, ckpt.params)
    reference = generate(params, ckpt.config, [prompt], mode="speed", block_length=4, max_new_tokens=32,
                         max_seq_len=128)
    assert artifact.run_steps([prompt], 32).tokens == reference.tokens


@needs_tensorrt
def test_runtime_refuses_engines_built_elsewhere(tmp_path):
    from tandemc.artifact import write_manifest
    from tandemc.errors import TandemcError

    export(tiny("gqa-4to2"), "gpu", tmp_path / "a", ExportOptions(block_length=2, max_seq_len=(32,), prefill_chunk=8,
                                                                  max_new_tokens=8))
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest["tensorrt"]["gpu"] = "Some Other GPU"
    write_manifest(tmp_path / "a", {k: v for k, v in manifest.items() if k != "files"})
    with pytest.raises(TandemcError, match="rebuild them with `tandemc build-engine"):
        load(tmp_path / "a")
