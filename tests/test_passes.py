"""Passes: exact ones keep the model's outputs, lossy ones report their effect, and every target lowers the result."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from tandemc.checkpoint import Checkpoint
from tandemc.cli import cli
from tandemc.errors import TandemcError
from tandemc.export import export, make_program
from tandemc.params import init_params
from tandemc.passes import PRESETS, REGISTRY, run_passes
from tandemc.program import ExportOptions, Program
from tandemc.runtime import load
from tandemc.tokenizer import ByteTokenizer

from conftest import CONFIGS

EXACT = [name for name, p in REGISTRY.items() if p.exact]
OPTIONS = dict(block_length=3, max_seq_len=(48,), batch=2, prefill_chunk=16, max_new_tokens=12)


def tiny(name="gqa-4to2", seed=1):
    cfg = CONFIGS[name].validate()
    return Checkpoint(cfg, init_params(cfg, seed), ByteTokenizer())


def weight_names(program):
    from tandemc.params import flatten
    return set(flatten(program.params))


@pytest.mark.parametrize("name", EXACT)
def test_each_exact_pass_rewrites_the_weights_and_keeps_the_logits(name):
    ckpt = tiny("shared-table" if name == "fold_draft_head" else "mha-odd-heads")
    if name == "dedupe_tied":  # an untied head that equals the table: the case the pass exists for
        ckpt.params["primary"]["lm_head"] = ckpt.params["primary"]["embed"].T.copy()
    before = Program.make(ckpt.config, ckpt.params, ExportOptions(**OPTIONS))
    after = run_passes(before, [name])
    report = after.passes[-1]
    assert report["name"] == name and report["check"]["ok"]
    assert report["check"]["max_abs_logit_diff"] <= 1e-4
    assert weight_names(after) != weight_names(before)  # the pass did something


@pytest.mark.slow
def test_o1_artifacts_are_token_identical_to_o0_and_make_fewer_matmuls(tmp_path):
    ckpt = tiny()
    prompts = [[5, 1, 3, 2] * 5, [4, 1, 2]]
    tokens, matmuls = {}, {}
    for level in ("O0", "O1"):
        manifest = export(ckpt, "cpu", tmp_path / level, ExportOptions(**OPTIONS), passes=level, verify_prompts=2)
        assert manifest["verification"]["ok"]
        assert [p["name"] for p in manifest["passes"]] == PRESETS[level]
        tokens[level] = load(tmp_path / level).run_steps(prompts, 12).tokens
        step = onnx.load(str(tmp_path / level / "step.s48.onnx"), load_external_data=False)
        matmuls[level] = sum(n.op_type == "MatMul" for n in step.graph.node)
    assert tokens["O1"] == tokens["O0"]
    assert matmuls["O1"] < matmuls["O0"]


@pytest.mark.slow
@pytest.mark.parametrize("spec, key, ratio, level", [
    ("quantize_int8", "q", 3.5, "1"), ("quantize_int4", "q", 6.0, "1"),
    ("quantize_int8:block=32:activations=int8", "qa", 32 / 9, "4"),
    ("quantize_int4:activations=int8", "qa", 6.0, "4")])
def test_quantized_artifacts_shrink_and_tpu_and_cpu_agree(spec, key, ratio, level, tmp_path):
    """Same integers, same math: the StableHLO and ONNX artifacts of a quantized Program give the same tokens, its
    matrices shrink by the bits' ratio (scales included), and ONNX Runtime runs them as MatMulNBits computing in
    float32 (weight-only, accuracy level 1) or with int8 activations (level 4), as the reference does."""
    import onnxruntime as ort

    ckpt = tiny()
    options = ExportOptions(**OPTIONS)
    program = make_program(ckpt, options, spec)
    report = program.passes[-1]
    layer = program.params["primary"]["layers"][0]
    assert layer["wq"][key].dtype.name == ("int8" if spec.startswith("quantize_int8") else "int4")
    assert {"top1_agreement", "max_abs_logit_diff"} <= set(report["check"]["per_model"]["primary"])
    assert set(report["check"]["mean_accepted_per_step"]) == {"before", "after"}
    prompts = [[5, 1, 3, 2] * 5, [4, 1, 2]]
    got = {}
    for target in ("tpu", "cpu"):
        manifest = export(ckpt, target, tmp_path / target, options, passes=spec, verify_prompts=2)
        assert manifest["verification"]["ok"], manifest["verification"]
        got[target] = load(tmp_path / target).run_steps(prompts, 12).tokens
    assert got["tpu"] == got["cpu"]
    assert manifest["onnx_session_config"] == {"session.qdq_matmulnbits_accuracy_level": level}
    float_dir = tmp_path / "float"
    export(ckpt, "cpu", float_dir, options, verify=False)
    from tandemc import safetensors_io
    def matrix_bytes(path):  # the layers' matrices, stored (int4 packed two per byte) with their scales
        locations = safetensors_io.tensor_locations(path / "weights.safetensors")
        return sum(n for name, (_, n) in locations.items() if ".layers." in name and "norm" not in name)
    assert matrix_bytes(float_dir) / matrix_bytes(tmp_path / "cpu") >= ratio * 0.85  # tiny matrices: scales weigh
    step = tmp_path / "cpu" / "step.s48.onnx"
    assert "DequantizeLinear" in {n.op_type for n in onnx.load(str(step), load_external_data=False).graph.node}
    options_ort = ort.SessionOptions()
    options_ort.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    for k, value in manifest["onnx_session_config"].items():
        options_ort.add_session_config_entry(k, value)
    ort.InferenceSession(str(step), options_ort, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    fused = [n for n in optimized.graph.node if n.op_type == "MatMulNBits"]  # ONNX Runtime fused DQ + MatMul
    assert fused
    if level == "4":  # an unfused pair would compute float activations: every matmul must be fused
        assert "DequantizeLinear" not in {n.op_type for n in optimized.graph.node}
    assert {a.i for n in fused for a in n.attribute if a.name == "accuracy_level"} == {int(level)}


@pytest.mark.parametrize("bits", [8, 4])
def test_int8_activation_matmul_computes_what_onnx_runtime_int8_kernels_compute(bits):
    """The reference primitive against ONNX Runtime's MatMulNBits at accuracy level 4, on a matrix whose last block
    is shorter (688 rows, blocks of 32): only float summation order may differ."""
    import jax.numpy as jnp
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from tandemc.passes.quantize import quantize_matrix
    from tandemc.primitives import int8_activation_matmul

    rng = np.random.default_rng(0)
    rows, cols = 688, 96
    m = quantize_matrix(rng.normal(size=(rows, cols)).astype(np.float32), bits, 32, "qa")
    assert m["scale"].shape == (22, cols)
    ints = np.asarray(m["qa"], np.int8)
    q = (numpy_helper.from_array(ints, "q") if bits == 8
         else helper.make_tensor("q", TensorProto.INT4, [rows, cols], ints.reshape(-1).tolist()))
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=0, block_size=32),
         helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, cols])], [q, numpy_helper.from_array(m["scale"], "s")])
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "4")
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
                                   .SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = (rng.normal(size=(5, rows)) * 3).astype(np.float32)
    got = session.run(None, {"x": x})[0]
    want = np.asarray(int8_activation_matmul(jnp.asarray(x), jnp.asarray(m["qa"]), jnp.asarray(m["scale"])))
    weight_only = x @ (ints * np.repeat(m["scale"], 32, axis=0)[:rows])
    assert np.max(np.abs(got - want)) <= 1e-6 * np.max(np.abs(want)) * 10
    assert np.max(np.abs(got - weight_only)) > 1e-3 * np.max(np.abs(want))  # the activations were quantized


def test_quantized_matrix_roundtrip_error_is_within_half_a_step():
    from tandemc.passes.quantize import quantize_matrix

    from tandemc.primitives import quant_block

    for rows, bits, block, blocks in ((96, 8, 0, 1), (96, 4, 32, 3), (96, 8, 32, 3), (688, 4, 32, 22),
                                      (688, 8, 128, 22), (100, 4, 32, 1)):
        w = np.random.default_rng(0).normal(size=(rows, 40)).astype(np.float32)
        qm = quantize_matrix(w, bits, block)
        assert qm["scale"].shape == (blocks, 40)  # a shorter last block where the block is recoverable
        step = np.repeat(qm["scale"], quant_block(rows, blocks), axis=0)[:rows]
        assert np.abs(qm["q"]).max() <= 2 ** (bits - 1) - 1
        assert np.all(np.abs(qm["q"] * step - w) <= step / 2 + 1e-7)


def test_asymmetric_blocks_reproduce_q4_1_weights_exactly():
    """llama.cpp's Q4_1 (w = d·u + m, u in 0..15, float16 d and m, every block spanning 0..15) dequantized and
    re-quantized asymmetrically: the same integers (q = u − 8) and scales; other weights within half a step."""
    from tandemc.passes.quantize import quantize_matrix

    rng = np.random.default_rng(0)
    u = rng.integers(0, 16, (96, 40))
    u[0::32], u[1::32] = 0, 15
    d = (rng.random((3, 40)) * 0.01 + 1e-3).astype(np.float16).astype(np.float32)
    m = (-rng.random((3, 40)) * 0.05).astype(np.float16).astype(np.float32)
    w = (np.repeat(d, 32, axis=0) * u + np.repeat(m, 32, axis=0)).astype(np.float32)
    got = quantize_matrix(w, 4, 32, scheme="asymmetric")
    np.testing.assert_array_equal(np.asarray(got["q"], np.int8) + 8, u)
    np.testing.assert_array_equal(got["scale"], d)
    np.testing.assert_allclose(got["offset"], m + 8 * d, rtol=1e-7)
    w = rng.normal(size=(688, 24)).astype(np.float32) + 3  # off-centre weights; 21 blocks of 32 and one of 16
    got = quantize_matrix(w, 4, 32, scheme="asymmetric")
    assert got["scale"].shape == got["offset"].shape == (22, 24)
    step = np.repeat(got["scale"], 32, axis=0)[:688]
    rebuilt = np.asarray(got["q"], np.float32) * step + np.repeat(got["offset"], 32, axis=0)[:688]
    assert np.all(np.abs(rebuilt - w) <= step / 2 + 1e-6)
    assert np.asarray(got["q"], np.int8).min() == -8 and np.asarray(got["q"], np.int8).max() == 7


def test_asymmetric_int4_and_a_quantized_tied_head_run_on_every_target(tmp_path):
    """int4 asymmetric layers plus an int8 LM head quantized from a tied embedding table (which stays a float
    lookup), weight-only so the gpu target takes it: every target verified, and all give the same tokens."""
    ckpt = tiny()
    assert ckpt.config.primary.tie_embeddings
    spec = "O1,quantize_int4:scheme=asymmetric,quantize_int8:block=32:keep=embed"
    program = make_program(ckpt, ExportOptions(**OPTIONS), spec)
    primary = program.params["primary"]
    assert not program.config.primary.tie_embeddings and primary["embed"].dtype == np.float32
    assert set(primary["lm_head"]) == {"q", "scale"} and primary["lm_head"]["q"].dtype == np.int8
    assert set(primary["layers"][0]["wqkv"]) == {"q", "scale", "offset"}
    tokens = []
    for target in ("cpu", "tpu", "gpu"):
        manifest = export(ckpt, target, tmp_path / target, ExportOptions(**OPTIONS), passes=spec, verify_prompts=2)
        assert manifest["verification"]["ok"] and manifest["verification"]["greedy_identical"]
        tokens.append(load(tmp_path / target, backend="onnxruntime" if target == "gpu" else None)
                      .run_steps([[5, 1, 3, 2] * 4, [4, 1]], 12).tokens)
    assert tokens[0] == tokens[1] == tokens[2]


def test_export_runs_the_checkpoints_own_passes_unless_told_otherwise(tiny_checkpoint, tmp_path):
    """A checkpoint's `export_passes` (import-gguf --keep-quantized sets them) are export's default; -O or --passes
    replace them."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "export_passes": "O1,quantize_int8:block=32"}))
    for flags, expected in [([], "quantize_int8"), (["-O1"], "fuse_gate_up"), (["--passes", "fuse_qkv"], "fuse_qkv")]:
        out = tmp_path / f"a{len(flags)}"
        result = CliRunner().invoke(cli, ["export", str(ckpt), "--target", "cpu", "-o", str(out), "--no-verify",
                                          "--max-seq-len", "128", "--json", *flags])
        assert result.exit_code == 0, result.output
        assert [p["name"] for p in json.loads(result.output)["passes"]][-1] == expected


@pytest.mark.slow
def test_bad_pass_requests_are_refused(tmp_path):
    program = Program.make(tiny().config, tiny().params, ExportOptions(**OPTIONS))
    with pytest.raises(TandemcError, match="unknown pass 'fuse_everything'"):
        run_passes(program, "fuse_everything")
    with pytest.raises(TandemcError, match="must run before quantization"):
        run_passes(program, ["quantize_int8", "fuse_qkv"])
    with pytest.raises(TandemcError, match="models='primary\\+teacher'"):
        run_passes(program, "quantize_int8:models=primary+teacher")
    with pytest.raises(TandemcError, match="activations=int8 needs block=16"):
        run_passes(program, "quantize_int8:activations=int8")  # per channel: no int8 kernel takes it
    with pytest.raises(TandemcError, match="activations='fp16'"):
        run_passes(program, "quantize_int8:activations=fp16")
    with pytest.raises(TandemcError, match="scheme='zero'"):
        run_passes(program, "quantize_int4:scheme=zero")
    mixed = run_passes(program, "quantize_int4:models=primary,quantize_int8:block=32:activations=int8:models=drafter")
    with pytest.raises(TandemcError, match="mixes weight-only and int8-activation"):
        export(tiny(), "cpu", tmp_path / "mixed", ExportOptions(**OPTIONS), passes=[
            (p["name"], p["options"]) for p in mixed.passes], verify=False)
    with pytest.raises(TandemcError, match="for the gpu target quantize weights only"):
        export(tiny(), "gpu", tmp_path / "gpu", ExportOptions(**OPTIONS), passes="O3", verify=False)
    assert not (tmp_path / "mixed").exists() and not (tmp_path / "gpu").exists()


@pytest.mark.slow
def test_cli_lists_passes_and_exports_o2_that_verify_rebuilds(tiny_checkpoint, tmp_path):
    runner = CliRunner()
    listed = json.loads(runner.invoke(cli, ["passes", "--json"]).output)
    assert [p["name"] for p in listed["passes"]] == list(REGISTRY) and listed["presets"]["O2"][-1] == "quantize_int8"
    out = tmp_path / "art"
    result = runner.invoke(cli, ["export", str(tiny_checkpoint), "--target", "cpu", "-o", str(out), "-O2",
                                 "--max-seq-len", "48", "--prefill-chunk", "16", "--max-new-tokens", "8",
                                 "--verify-prompts", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert [p["name"] for p in json.loads(result.output)["passes"]] == PRESETS["O2"]
    result = runner.invoke(cli, ["verify", str(out), "--checkpoint", str(tiny_checkpoint), "--prompts", "1"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["export", str(tiny_checkpoint), "--target", "cpu", "-o", str(tmp_path / "x"),
                                 "--passes", "fuse_qkv,nonsense"])
    assert result.exit_code == 2 and "unknown pass 'nonsense'" in result.output
    assert not (tmp_path / "x").exists()


def test_fold_draft_head_gives_each_drafter_one_head_and_drops_the_shared_table():
    """A drafter that writes through the primary's table (head_proj, then the draft tokens' rows, then `other`)
    gets one [d, N + 1] head: the drafts read d × (N + 1) weights instead of d × d_primary + d_primary × N, with
    the same logits and the same SPEED tokens."""
    from tandemc.decoding import generate
    ckpt = tiny("shared-table", seed=4)
    options = ExportOptions(mode="speed", **{k: v for k, v in OPTIONS.items() if k != "batch"}, batch=1)
    before = make_program(ckpt, options, "O0")
    after = run_passes(before, ["fold_draft_head"])
    cfg = after.config
    assert after.passes[-1]["drafters"] == ["secondary", "drafter"]
    assert "head" not in after.params["draft_vocab"]
    for name in ("secondary", "drafter"):
        p, d = after.params[name], getattr(cfg, name).d_model
        assert "head_proj" not in p and "other" not in p and not getattr(cfg, name).tie_embeddings
        assert p["lm_head"].shape == (d, cfg.draft_vocab + 1)
    prompts = [[5, 1, 3, 2] * 4]
    runs = [generate(program.params, program.config, prompts, mode=mode, block_length=3, max_new_tokens=16,
                     max_seq_len=48) for program in (before, after) for mode in ("speed", "vanilla")]
    assert all(r.tokens == runs[0].tokens for r in runs)
    for unfolded, folded in ((runs[0], runs[2]), (runs[1], runs[3])):  # the same drafts: the same acceptance
        assert unfolded.stats["mean_accepted_per_step"] == folded.stats["mean_accepted_per_step"]


def test_quantized_draft_heads_leave_the_outputs_exact(tmp_path):
    """The drafters (their folded heads: the primary's table over the draft vocabulary, which every draft reads)
    quantized with int8 activations. Only the drafts may change: the artifact verifies against its program, and
    its greedy tokens are the float primary's own. models=draft_vocab, the unfolded shared head, is refused once
    -O1 has folded it."""
    from tandemc.decoding import generate
    cfg = CONFIGS["shared-table"].validate()
    ckpt = Checkpoint(cfg, init_params(cfg, 3), ByteTokenizer())
    options = ExportOptions(mode="speed", batch=2, block_length=3, max_seq_len=(40,), prefill_chunk=16,
                            max_new_tokens=12)
    with pytest.raises(TandemcError, match="models=draft_vocab: no drafter reads the shared head"):
        make_program(ckpt, options, "O1,quantize_int8:models=draft_vocab:activations=int8:block=16")
    unfolded = make_program(ckpt, options, "fuse_qkv,quantize_int8:models=draft_vocab:activations=int8:block=16")
    assert set(unfolded.params["draft_vocab"]["head"]) == {"qa", "scale"}
    spec = "O1,quantize_int8:models=secondary+drafter:keep=embed:activations=int8:block=16"
    program = make_program(ckpt, options, spec)
    assert set(program.params["secondary"]["lm_head"]) == {"qa", "scale"}
    assert program.params["primary"]["embed"].dtype == np.float32
    manifest = export(ckpt, "cpu", tmp_path / "a", options, passes=spec)
    assert manifest["verification"]["ok"] and manifest["verification"]["greedy_identical"]
    prompts = [[5, 1, 3, 2] * 4, [4, 1]]
    primary = generate(ckpt.params, cfg, prompts, mode="primary", max_new_tokens=20, max_seq_len=40)
    assert load(tmp_path / "a").run_steps(prompts, 20).tokens == primary.tokens
