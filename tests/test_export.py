"""The TPU target: exported StableHLO artifacts run here token-identical to the reference; the artifact contract."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import onnx
import pytest

from conftest import CONFIGS, decoder, make
from tandemc import artifact as artifact_io
from tandemc.checkpoint import Checkpoint, load_checkpoint
from tandemc.config import TandemConfig
from tandemc.decoding import generate
from tandemc.errors import TandemcError
from tandemc.export import export
from tandemc.program import ExportOptions, Program
from tandemc.runtime import load
from tandemc.tokenizer import ByteTokenizer
from tandemc.verify import verify


def checkpoint(name, seed=1):
    cfg, params = make(CONFIGS[name], seed)
    return Checkpoint(cfg, jax.tree.map(np.asarray, params), ByteTokenizer())


def export_ok(ckpt, out, target="tpu", passes=(), **options):
    manifest = export(ckpt, target, out, ExportOptions(**options), platforms=["cpu"] if target == "tpu" else None,
                      verify_prompts=4, passes=passes)
    report = manifest["verification"]
    assert report["ok"], report
    return manifest


# Greedy (host steps, and the in-graph generate where the target has it) and fixed-seed sampling are
# token-identical to the reference, and the verify-block logits agree within 1e-3 (verify()'s checks; the CPU
# target's bar is 1e-4). CPU exports are quick: every shape × (B, γ) ∈ {(1, 1), (4, 4), (4, 8), (1, 8)}. TPU
# exports compile with XLA: every shape once, the four (B, γ) pairs spread over the shapes. The inner-loop tier
# keeps the CPU exports at (1, 1) and (4, 4); the rest run in the full suite (marked slow).
MATRIX = [pytest.param("cpu", name, b, g, marks=() if g < 8 else pytest.mark.slow)
          for name in sorted(CONFIGS) for b, g in [(1, 1), (4, 4), (4, 8), (1, 8)]] + [
    pytest.param("tpu", name, *[(1, 1), (4, 4), (4, 8), (1, 8)][i % 4], marks=pytest.mark.slow)
    for i, name in enumerate(sorted(CONFIGS))]


@pytest.mark.parametrize("target, name, batch, gamma", MATRIX)
def test_artifact_matches_reference(target, name, batch, gamma, tmp_path):
    manifest = export_ok(checkpoint(name), tmp_path / "a", target, batch=batch, block_length=gamma,
                         max_seq_len=(48,), prefill_chunk=8, max_new_tokens=16)
    if target == "cpu":
        assert manifest["verification"]["max_abs_logit_diff"] <= 1e-4
        for entry in manifest["graphs"].values():
            onnx.checker.check_model(str(tmp_path / "a" / entry["onnx"]), full_check=True)


@pytest.mark.parametrize("name, mode", [("draft-vocab", "vanilla"), ("draft-vocab", "speed"),
                                        ("shared-table", "vanilla"), ("shared-table", "adaptive")])
def test_draft_vocabulary_exports_and_matches(name, mode, tmp_path):
    """Drafters that propose part of the vocabulary: the graphs map ids both ways (Gather) and spread sampled
    drafts' distributions over the primary's vocabulary; with shared_embeddings they read the primary's table and
    the program holds its draft rows once (draft_vocab.head). Verified like every export, greedy and sampled."""
    manifest = export_ok(checkpoint(name), tmp_path / "a", "cpu", mode=mode, batch=2, block_length=3,
                         max_seq_len=(40,), prefill_chunk=16, max_new_tokens=12)
    report = manifest["verification"]
    assert report["greedy_identical"] and report["sampled_identical"]
    weights = {n for g in manifest["graphs"].values() for n in g["weights"]}
    assert {"draft_vocab.tokens", "draft_vocab.index"} <= weights
    assert ("draft_vocab.head" in weights) == (name == "shared-table")


@pytest.mark.parametrize("target, mode", [("cpu", m) for m in ("primary", "vanilla", "tandem", "adaptive")]
                         + [pytest.param("tpu", m, marks=pytest.mark.slow) for m in ("vanilla", "adaptive")])
def test_every_mode_exports_and_matches(mode, target, tmp_path):
    name = {"vanilla": "gqa-4to2", "adaptive": "custom-map"}.get(mode, "mha-odd-heads")
    manifest = export_ok(checkpoint(name), tmp_path / "a", target, mode=mode, batch=2, block_length=3,
                         max_seq_len=(40,), prefill_chunk=16, max_new_tokens=12)
    assert manifest["decode"]["mode"] == mode
    weights = {n.split(".")[0] for g in manifest["graphs"].values() for n in g["weights"]}
    assert weights == {"primary": {"primary"}, "vanilla": {"primary", "drafter"},
                       "tandem": {"primary", "secondary", "tandem"},
                       "adaptive": {"primary", "secondary", "tandem", "tandem_input", "router"}}[mode]  # the variant


def test_adaptive_step_skips_the_drafts_after_the_router_stops(tmp_path):
    """Adaptive block length saves time only if the drafts after the router's stop are not computed: in the cpu
    artifact they sit in ONNX If branches that do not run once every row has stopped (counted in ONNX Runtime's
    profile), and the tokens stay the primary's either way."""
    import dataclasses

    ckpt = checkpoint("custom-map")
    prompts = [[1, 2, 3], [4, 5, 0, 1, 2]]
    reference = generate(jax.tree.map(jax.numpy.asarray, ckpt.params), ckpt.config, prompts, mode="primary",
                         max_new_tokens=12)
    kernels = {}
    for router, bias in (("always stops", 30.0), ("never stops", -30.0)):
        params = {**ckpt.params, "router": {**ckpt.params["router"], "b2": np.full((1,), bias, np.float32)}}
        out = tmp_path / router.replace(" ", "-")
        export_ok(dataclasses.replace(ckpt, params=params), out, "cpu", mode="adaptive", batch=1, block_length=4,
                  max_seq_len=(48,), prefill_chunk=16, max_new_tokens=12)
        art = load(out, profile=tmp_path / f"{out.name}-traces", threads=1)
        result = art.generate(prompts, max_new_tokens=12)
        assert result.tokens == reference.tokens
        assert result.stats["drafted"] == (0 if bias > 0 else 4 * result.stats["row_steps"])
        trace = next(f for key, f in art.backend.end_profiling().items() if key.startswith("step"))
        events = json.loads(Path(trace).read_text())
        runs = sum(e.get("name") == "model_run" for e in events)
        nodes = [e["name"] for e in events if e.get("cat") == "Node"]
        kernels[router] = {t: sum(name.startswith(f"draft{t}/") for name in nodes) / runs for t in range(4)}
    skipped, computed = kernels["always stops"], kernels["never stops"]
    assert skipped[0] == computed[0]  # the first draft always runs: the router reads its distribution
    assert all(skipped[t] < computed[t] / 4 for t in (1, 2, 3)), kernels


@pytest.mark.slow
def test_buckets_pick_the_smallest_cache_and_all_verify(tmp_path):
    manifest = export_ok(checkpoint("gqa-4to2"), tmp_path / "a", batch=2, block_length=2, max_seq_len=(24, 64),
                         prefill_chunk=8, max_new_tokens=8)
    assert [b["cache_length"] for b in manifest["verification"]["buckets"]] == [24, 64]
    art = load(tmp_path / "a")
    assert art.bucket(10, 8) == 24 and art.bucket(17, 8) == 64
    with pytest.raises(TandemcError, match="exceeds the artifact's largest cache length 64"):
        art.bucket(60, 8)


@pytest.mark.slow
def test_step_loop_and_generate_graph_agree_on_batches_larger_than_the_artifact(tmp_path):
    export_ok(checkpoint("mqa-5to1"), tmp_path / "a", batch=2, block_length=4, max_seq_len=(64,), prefill_chunk=8,
              max_new_tokens=20)
    art = load(tmp_path / "a")
    prompts = [[1, 2], [3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6], [2]]
    steps = art.generate(prompts, max_new_tokens=20, temperature=0.7, seed=3)
    graph = art.generate(prompts, max_new_tokens=20, temperature=0.7, seed=3, use_generate_graph=True)
    assert steps.tokens == graph.tokens and all(len(t) == 20 for t in steps.tokens)
    assert steps.stats["accepted"] == graph.stats["accepted"] and steps.stats["drafted"] == graph.stats["drafted"]


@pytest.mark.parametrize("target", [pytest.param("tpu", marks=pytest.mark.slow), "cpu"])
def test_export_is_byte_identical_and_refuses_to_overwrite(target, tmp_path):
    ckpt = checkpoint("custom-map")
    options = dict(batch=1, block_length=2, max_seq_len=(32,), prefill_chunk=8, max_new_tokens=8)
    export_ok(ckpt, tmp_path / "a", target, **options)
    export_ok(ckpt, tmp_path / "b", target, **options)
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert not any(b"/tmp" in (tmp_path / "a" / n).read_bytes() for n in files_a)
    with pytest.raises(TandemcError, match="already exists; pass --force"):
        export(ckpt, target, tmp_path / "a", ExportOptions(**options))


SMALL_TPU = dict(batch=1, block_length=2, max_seq_len=(32,), prefill_chunk=8, max_new_tokens=8)


@pytest.fixture(scope="module")
def gqa_tpu(tmp_path_factory):
    """A verified TPU artifact of gqa-4to2, exported once; tests that alter it work on a copy."""
    path = tmp_path_factory.mktemp("gqa") / "a"
    export_ok(checkpoint("gqa-4to2"), path, **SMALL_TPU)
    return path


def test_tampered_or_foreign_artifacts_are_refused(gqa_tpu, tmp_path):
    shutil.copytree(gqa_tpu, tmp_path / "a")
    weights = tmp_path / "a" / artifact_io.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(TandemcError, match="weights.safetensors does not match its sha256"):
        load(tmp_path / "a")
    weights.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 1]))
    (tmp_path / "a" / "extra.bin").write_bytes(b"x")
    with pytest.raises(TandemcError, match="extra.bin is not listed in the manifest"):
        load(tmp_path / "a")
    (tmp_path / "a" / "extra.bin").unlink()
    manifest_file = tmp_path / "a" / artifact_io.MANIFEST
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(TandemcError, match="schema_version 99; this tandemc reads version 1"):
        load(tmp_path / "a")
    manifest_file.write_text(json.dumps({**manifest, "format": "other"}))
    with pytest.raises(TandemcError, match="is not a tandemc artifact manifest"):
        load(tmp_path / "a")


def test_verify_detects_an_artifact_that_differs_from_its_checkpoint(gqa_tpu):
    ckpt = checkpoint("gqa-4to2")
    wrong = jax.tree.map(lambda a: a * 1.5, ckpt.params)
    report = verify(load(gqa_tpu), Program.make(ckpt.config, wrong, ExportOptions(**SMALL_TPU)), prompts=2)
    assert not report["ok"] and report["max_abs_logit_diff"] > 1e-3


@pytest.mark.parametrize("options, message", [
    (dict(mode="adaptive"), "needs a router"),
    (dict(mode="fast"), "unknown mode"),
    (dict(block_length=65), "block length must be in 1..64"),
    (dict(max_seq_len=(64, 32)), "distinct cache lengths in increasing order"),
    (dict(max_seq_len=(4096,)), "must be in 2..128"),
    (dict(prefill_chunk=0), "prefill-chunk must be in 1..64"),
    (dict(max_new_tokens=64), "max-new-tokens must be in 1..63"),
    (dict(batch=0), "batch must be >= 1"),
    (dict(dtype="int8"), "dtype must be one of"),
])
def test_invalid_options_are_refused_up_front(options, message, tmp_path):
    ckpt = checkpoint("gqa-4to2")
    with pytest.raises(TandemcError, match=message):
        export(ckpt, "tpu", tmp_path / "a", ExportOptions(**{"max_seq_len": (64,), **options}))
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_bfloat16_artifact_matches_its_reference(tmp_path):
    manifest = export_ok(checkpoint("mha-odd-heads"), tmp_path / "a", batch=2, block_length=4, max_seq_len=(32,),
                         prefill_chunk=8, max_new_tokens=8, dtype="bfloat16")
    header = json.loads((tmp_path / "a" / artifact_io.WEIGHTS).read_bytes()[8:8 + int.from_bytes(
        (tmp_path / "a" / artifact_io.WEIGHTS).read_bytes()[:8], "little")])
    assert {e["dtype"] for k, e in header.items() if k != "__metadata__"} == {"BF16"}
    assert manifest["decode"]["dtype"] == "bfloat16"


SHARDED = """
import json, sys
import jax, numpy as np
sys.path.insert(0, sys.argv[2])
from conftest import CONFIGS, decoder, make
from tandemc.checkpoint import Checkpoint, load_checkpoint
from tandemc.config import TandemConfig
from tandemc.decoding import generate
from tandemc.export import export
from tandemc.program import ExportOptions
from tandemc.runtime import load
from tandemc.tokenizer import ByteTokenizer

cfg, params = make(CONFIGS[sys.argv[3]], 1)
ckpt = Checkpoint(cfg, jax.tree.map(np.asarray, params), ByteTokenizer())
options = dict(batch=4, block_length=3, max_seq_len=(48,), prefill_chunk=8, max_new_tokens=16)
out = sys.argv[1]
plain = export(ckpt, "tpu", out + "/plain", ExportOptions(**options), platforms=["cpu"])
sharded = export(ckpt, "tpu", out + "/sharded", ExportOptions(**options, mesh=(2, 4)), platforms=["cpu"])
prompts = [[1, 2, 3], [4], [5, 0, 1, 2, 3, 4, 5, 0, 1, 2], [2, 2], [3]]
runs = {name: [load(out + "/" + name).generate(prompts, 16, temperature=t, seed=4).tokens for t in (0.0, 0.9)]
        for name in ("plain", "sharded")}
print(json.dumps({"devices": jax.device_count(), "verified": sharded["verification"]["ok"],
                  "mesh": sharded["mesh"], "same_tokens": runs["plain"] == runs["sharded"],
                  "sharded_inputs": sum(any(a for a in spec) for spec in
                                        sharded["graphs"]["step.s48"]["sharding"]["inputs"])}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["custom-map"])
def test_sharded_artifact_gives_the_unsharded_tokens_on_8_devices(name, tmp_path):
    """Tensor parallelism over heads/MLP width (model=4) and batch rows (data=2) on 8 simulated CPU devices."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"}
    proc = subprocess.run([sys.executable, "-c", SHARDED, str(tmp_path), str(Path(__file__).parent), name], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8 and result["verified"] and result["same_tokens"]
    assert result["mesh"] == {"axes": ["data", "model"], "shape": [2, 4]} and result["sharded_inputs"] > 10
    with pytest.raises(TandemcError, match="mesh 2x4 needs 8 devices, this host has 1"):
        load(tmp_path / "sharded")


SAVEDMODEL = """
import json, sys
import jax, numpy as np
sys.path.insert(0, sys.argv[2])
from conftest import CONFIGS, decoder, make
from tandemc.checkpoint import Checkpoint
from tandemc.export import export
from tandemc.program import ExportOptions
from tandemc.runtime import load
from tandemc.tokenizer import ByteTokenizer

cfg, params = make(CONFIGS["gqa-4to2"], 1)
ckpt = Checkpoint(cfg, jax.tree.map(np.asarray, params), ByteTokenizer())
manifest = export(ckpt, "tpu", sys.argv[1], ExportOptions(batch=2, block_length=3, max_seq_len=(40,), prefill_chunk=8,
                  max_new_tokens=12), platforms=["cpu", "tpu"], savedmodel=True, verify_prompts=3)
tf_run, jax_run = load(sys.argv[1], backend="savedmodel"), load(sys.argv[1])
prompts = [[1, 2, 3], [0], [5, 4, 3, 2, 1, 0, 1, 2, 3]]
same = [tf_run.generate(prompts, 12, temperature=t, seed=5).tokens == jax_run.generate(prompts, 12, temperature=t,
        seed=5).tokens for t in (0.0, 0.8)]
print(json.dumps({"verified": manifest["verification"]["ok"], "tf_verified": manifest["verification_savedmodel"]["ok"],
                  "signature": manifest["savedmodel"]["signatures"]["step.s40"], "same": same,
                  "variables": any(n.startswith("savedmodel/variables/") for n in manifest["files"])}))
"""


@pytest.mark.slow
def test_savedmodel_wraps_the_same_graphs_and_matches_the_reference(tmp_path):
    """`--savedmodel`: TensorFlow loads the SavedModel and, driven by the manifest, gives the reference's tokens.
    In its own process: TensorFlow and jaxlib in one process are not safe for later XLA compilations."""
    proc = subprocess.run([sys.executable, "-c", SAVEDMODEL, str(tmp_path / "a"), str(Path(__file__).parent)],
                          env={**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"verified": True, "tf_verified": True, "signature": "step_s40", "same": [True, True],
                      "variables": True}


def test_cpu_graphs_use_onnx_runtime_fused_operators(tmp_path):
    """The named primitives reach ONNX Runtime's fused kernels instead of chains of small ops, and greedy
    decoding skips the sampling branch (an If on temperature)."""
    manifest = export_ok(checkpoint("gqa-4to2"), tmp_path / "a", "cpu", batch=1, block_length=2,
                         max_seq_len=(32,), prefill_chunk=8, max_new_tokens=8)
    step = onnx.load(str(tmp_path / "a" / manifest["graphs"]["step.s32"]["onnx"]), load_external_data=False)
    ops = {node.op_type for node in step.graph.node}
    # head_dim 8 is below GroupQueryAttention's multiple of 16: the opset-23 kernels carry the attention
    assert {"RMSNormalization", "RotaryEmbedding", "Attention", "ScatterND", "Gather", "If"} <= ops
    assert "Einsum" not in ops  # attention reads the caches where they lie, never a transposed copy:
    cache_writes = {out for n in step.graph.node if n.op_type == "ScatterND" for out in n.output}
    inputs = {i.name for i in step.graph.input}
    assert not any(n.input[0] in cache_writes | inputs for n in step.graph.node if n.op_type == "Transpose")
    assert not ops & {"Sort", "Loop", "Scan"}  # loop-free step graphs, as the GPU target needs too
    generate = onnx.load(str(tmp_path / "a" / manifest["graphs"]["generate.s32"]["onnx"]), load_external_data=False)
    assert [n.op_type for n in generate.graph.node].count("Loop") == 2  # prefill chunks, then steps
    assert all(init.data_location == onnx.TensorProto.EXTERNAL for init in step.graph.initializer
               if init.name.startswith(("primary.", "secondary.", "tandem.")))


def test_cpu_cached_attention_lowers_to_group_query_attention(tmp_path):
    """With head_dim a multiple of 16 at batch 1, RoPE, the cache write and attention are one
    GroupQueryAttention per layer that updates the cache in place, fed by the fused QKV matmul whole; the
    artifact stays token-identical to the reference (export_ok's verification) within 1e-4 in the logits."""
    config = TandemConfig(decoder(6, 64, 2, 4, 2, 16), decoder(6, 32, 1, 2, 1, 16))
    cfg, params = make(config, seed=3)
    ckpt = Checkpoint(cfg, jax.tree.map(np.asarray, params), ByteTokenizer())
    manifest = export_ok(ckpt, tmp_path / "a", "cpu", batch=1, block_length=3, max_seq_len=(48,), prefill_chunk=8,
                         max_new_tokens=12, passes=("fuse_qkv",))
    assert manifest["verification"]["max_abs_logit_diff"] <= 1e-4
    step = onnx.load(str(tmp_path / "a" / manifest["graphs"]["step.s48"]["onnx"]), load_external_data=False)
    gqa = [n for n in step.graph.node if n.op_type == "GroupQueryAttention"]
    # primary layers and secondary layers each attend over a cache (the secondary twice per drafted token)
    assert len(gqa) >= cfg.primary.n_layers + cfg.secondary.n_layers
    assert any(n.input[1] == "" and n.input[2] == "" for n in gqa)  # packed QKV from fuse_qkv
    onnx.checker.check_model(str(tmp_path / "a" / manifest["graphs"]["step.s48"]["onnx"]), full_check=True)


EXAMPLE = Path(__file__).parent.parent / "examples" / "tandem-stdlib"


@pytest.mark.slow
@pytest.mark.parametrize("target, batch, gamma", [("tpu", 4, 4), ("cpu", 1, 8), ("cpu", 4, 1)])
def test_bundled_example_artifacts_match_the_reference(target, batch, gamma, tmp_path):
    """The trained example: real drafts get accepted, so the acceptance path carries most tokens here."""
    ckpt = load_checkpoint(EXAMPLE)
    manifest = export_ok(ckpt, tmp_path / "a", target, batch=batch, block_length=gamma, max_seq_len=(160,),
                         prefill_chunk=32, max_new_tokens=32)
    art = load(tmp_path / "a")
    prompts = ["def main(argv):\n    ", "import os\n", "class Parser:\n    \"\"\"", "    return self."][:batch + 1]
    result = art.generate(prompts, max_new_tokens=32, temperature=0.0)
    ids = [ckpt.tokenizer.encode(p) for p in prompts]
    params = jax.tree.map(jax.numpy.asarray, ckpt.params)
    ref = generate(params, ckpt.config, ids, mode="speed", block_length=gamma, max_new_tokens=32,
                   eos_id=ckpt.tokenizer.eos_id, max_seq_len=160)
    assert result.tokens == ref.tokens and result.stats["accepted"] == ref.stats["accepted"] > 0
    if target == "cpu":
        assert manifest["verification"]["max_abs_logit_diff"] <= 1e-4
