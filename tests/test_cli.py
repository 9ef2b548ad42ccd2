"""The command line: init, inspect, generate; --json shapes; one-line errors with exit status 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tandemc.cli import cli


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def tiny(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def tpu_export(tiny_checkpoint, tmp_path_factory):
    """`tandemc export --target tpu --json` of the tiny checkpoint with two cache buckets, built once and read by
    the tests that run, inspect and verify it: (artifact directory, the command's JSON output)."""
    art = tmp_path_factory.mktemp("tpu") / "art"
    out = json.loads(run("export", tiny_checkpoint, "--target", "tpu", "-o", art, "--batch", 2, "--max-seq-len",
                         "48,96", "--prefill-chunk", 16, "--max-new-tokens", 12, "--platforms", "cpu", "--json").output)
    return art, out


def test_every_command_has_help():
    for command in ([], ["init"], ["inspect"], ["generate"]):
        result = run(*command, "--help")
        assert "Usage:" in result.output and ("--json" in result.output or not command)


def test_init_and_inspect(tiny, tmp_path):
    data = json.loads(run("inspect", tiny, "--json").output)
    assert data["models"]["primary"]["layers"] == 2 and data["models"]["secondary"]["d_model"] == 32
    assert data["layer_map"] == [1] and data["gamma_train"] == 2
    assert data["total_parameters"] == sum(
        [data["models"][m]["parameters"] for m in data["models"]] + [data["tandem_parameters"],
                                                                     data["router_parameters"]])
    assert data["bytes_by_dtype"] == {"F32": 4 * data["total_parameters"]}
    assert "layer map" in run("inspect", tiny).output
    # --config FILE initialises from a config.json
    out = json.loads(run("init", tmp_path / "again", "--config", tiny / "config.json", "--json").output)
    assert sum(out["parameters"].values()) == data["total_parameters"]


def test_generate_json(tiny):
    data = json.loads(run("generate", tiny, "--prompt", "def f(", "-n", 12, "--json").output)
    assert set(data) >= {"tokens", "text", "stats"}
    assert len(data["tokens"]) == 12 and all(isinstance(t, int) for t in data["tokens"])
    assert set(data["stats"]) >= {"steps", "drafted", "accepted", "mean_accepted_per_step", "acceptance_rate"}
    primary = json.loads(run("generate", tiny, "--prompt", "def f(", "-n", 12, "--mode", "primary", "--json").output)
    assert primary["tokens"] == data["tokens"]  # greedy SPEED is the primary's output


def test_generate_sampling_and_stats(tiny):
    args = ("generate", tiny, "--prompt", "x", "-n", 10, "-t", "0.9", "--top-k", 20, "--top-p", "0.95")
    a = json.loads(run(*args, "--seed", 3, "--json").output)
    assert a["tokens"] == json.loads(run(*args, "--seed", 3, "--json").output)["tokens"]
    result = CliRunner().invoke(cli, [str(x) for x in args] + ["--stats", "--mode", "vanilla", "-g", "3"])
    assert result.exit_code == 0 and "mean accepted/step" in result.output


@pytest.mark.parametrize("args, message", [
    (["generate", "{tiny}", "--prompt", "x", "-n", "999"], "exceeds the cache length 256"),
    (["generate", "{tiny}/nope", "--prompt", "x"], "does not exist"),
    (["generate", "{tiny}", "--prompt", "x", "-t", "-1"], "--temperature >= 0"),
    (["generate", "{tiny}", "--prompt", "x", "--chat"], "this model has no chat template"),
    (["init", "{tiny}", "--preset", "tiny"], "already exists; pass --force"),
    (["init", "{tiny}2", "--preset", "huge"], "unknown preset 'huge'"),
    (["init", "{tiny}3"], "exactly one of --preset NAME or --config FILE"),
    (["inspect", "{tiny}/config.json"], "does not exist"),
])
def test_errors_are_one_line_with_exit_2(tiny, args, message):
    result = run(*[a.format(tiny=tiny) for a in args], ok=False)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_console_script_entry_point(tiny):
    proc = subprocess.run([sys.executable, "-m", "tandemc.cli", "inspect", str(tiny), "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and json.loads(proc.stdout)["dtype"] == "float32"
    proc = subprocess.run([sys.executable, "-m", "tandemc.cli", "inspect", str(tiny / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")


@pytest.mark.slow
def test_evaluate_reports_accuracies_and_acceptance(tiny, tmp_path):
    from tandemc.data import stdlib_root

    for name in ("heapq.py", "bisect.py"):
        (tmp_path / name).write_bytes((stdlib_root() / name).read_bytes())
    data = json.loads(run("evaluate", tiny, "--data", tmp_path, "--windows", 4, "--seq-len", 32, "--gammas", "1,3",
                          "--prompts", 2, "--new-tokens", 6, "--json").output)
    for key in ("primary_accuracy", "standalone_accuracy", "tandem_accuracy", "relative_tv"):
        assert 0.0 <= data[key] <= 1.0 or key == "relative_tv"
    assert set(data["acceptance"]) == {"1", "3"}
    assert set(data["acceptance"]["3"]) == {"tandem", "standalone", "adaptive", "adaptive_drafted"}  # tiny has a router
    assert 0.0 <= data["acceptance"]["3"]["adaptive_drafted"] <= 3.0
    assert data["positions"] == 4 * 32
    for name in ("tandem", "standalone"):  # by position in the tandem's blocks of γ_train; 31 = 7 blocks + 3
        by_position = data[f"{name}_agreement_by_position"]
        assert len(by_position) == data["block_length"] == json.loads((tiny / "config.json").read_text())["gamma_train"]
        weights = [len(range(j, 31, data["block_length"])) for j in range(data["block_length"])]
        assert sum(a * w for a, w in zip(by_position, weights)) / 31 == pytest.approx(data[f"{name}_agreement"])
    # the tandem's agreement at each --gammas block length, and γ_train's, is what -g with that length measures
    by_block = data["tandem_agreement_by_block_length"]
    assert set(by_block) == {"1", "3", str(data["block_length"])}
    assert by_block[str(data["block_length"])] == data["tandem_agreement"]
    for gamma in ("1", "3"):
        alone = json.loads(run("evaluate", tiny, "--data", tmp_path, "--windows", 4, "--seq-len", 32, "-g", gamma,
                               "--gammas", 1, "--prompts", 1, "--new-tokens", 1, "--json").output)
        assert by_block[gamma] == pytest.approx(alone["tandem_agreement"], abs=1e-9)


@pytest.mark.slow
def test_export_run_inspect_verify(tiny, tpu_export):
    art, out = tpu_export
    assert out["verification"]["ok"] and out["graphs"] == sorted(
        f"{g}.s{s}" for g in ("generate", "prefill", "step") for s in (48, 96))
    # `run --json` has the shape of `generate --json`, and the same greedy tokens as the reference
    ran = json.loads(run("run", art, "--prompt", "def f(", "-n", 12, "--json").output)
    ref = json.loads(run("generate", tiny, "--prompt", "def f(", "-n", 12, "--json").output)
    assert set(ran) >= {"tokens", "text", "stats"} and ran["tokens"] == ref["tokens"] and ran["text"] == ref["text"]
    graph = json.loads(run("run", art, "--prompt", "def f(", "-n", 12, "--generate-graph", "--json").output)
    assert graph["tokens"] == ref["tokens"]
    info = json.loads(run("inspect", art, "--json").output)
    assert info["target"] == "tpu" and info["decode"]["cache_buckets"] == [48, 96] and info["verification"]["ok"]
    assert "graph step.s48" in run("inspect", art).output
    assert run("verify", art, "--checkpoint", tiny, "--prompts", 2).output.startswith("OK:")
    again = run("export", tiny, "--target", "tpu", "-o", art, ok=False)
    assert again.exit_code == 2 and "already exists; pass --force" in again.output


@pytest.mark.slow
def test_verify_fails_on_a_different_checkpoint(tpu_export, tmp_path):
    run("init", tmp_path / "other", "--preset", "tiny", "--seed", 2)
    result = run("verify", tpu_export[0], "--checkpoint", tmp_path / "other", "--prompts", 2, ok=False)
    assert result.exit_code == 1 and result.output.startswith("MISMATCH:")


@pytest.mark.parametrize("args, message", [
    (("--max-seq-len", "64,32"), "increasing order"),
    (("--mesh", "2by4"), "--mesh takes DATAxMODEL"),
    (("--mesh", "4x1", "--batch", "2"), "multiple of the mesh's data axis"),
    (("--max-seq-len", "abc"), "takes integers"),
])
def test_export_refuses_bad_options_in_one_line(tiny, tmp_path, args, message):
    result = run("export", tiny, "--target", "tpu", "-o", tmp_path / "art", *args, ok=False)
    lines = [line for line in result.output.splitlines() if line]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "art").exists()


@pytest.mark.slow
def test_cpu_artifact_and_the_dependency_light_consumer(tiny, tmp_path):
    """The ONNX artifact runs in `tandemc run` and in examples/onnxruntime_generate.py (onnxruntime + numpy only)
    with the reference's tokens, greedy and sampled."""
    art = tmp_path / "cpu"
    out = json.loads(run("export", tiny, "--target", "cpu", "-o", art, "--batch", 2, "--max-seq-len", "64,128",
                         "--prefill-chunk", 16, "--json").output)
    assert out["verification"]["ok"] and out["verification"]["generate_graph_identical"]  # ONNX Loop
    example = Path(__file__).parent.parent / "examples" / "onnxruntime_generate.py"
    for extra in ([], ["-t", "0.7", "--seed", "3"]):
        ref = json.loads(run("generate", tiny, "--prompt", "def f(", "-n", 20, *extra, "--json").output)
        ran = json.loads(run("run", art, "--prompt", "def f(", "-n", 20, *extra, "--json").output)
        assert ran["tokens"] == ref["tokens"]
        flags = ["--temperature", extra[1], "--seed", extra[3]] if extra else []
        proc = subprocess.run([sys.executable, str(example), str(art), "def f(", "--max-new-tokens", "20", *flags],
                              capture_output=True, text=True, env={"PATH": "", "PYTHONPATH": ""}, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout[:-1] == ref["text"]


def test_export_router_threshold_sets_where_adaptive_drafting_stops(tiny, tmp_path):
    """`export --router-threshold` bakes τ into an adaptive artifact (recorded in the manifest's model): at τ = 0
    every first draft is predicted rejected, so no draft is ever proposed and each step emits the primary's token."""
    art = tmp_path / "never"
    run("export", tiny, "--target", "cpu", "-o", art, "--mode", "adaptive", "-g", 3, "--router-threshold", 0.0,
        "--max-seq-len", 64, "--prefill-chunk", 16, "--max-new-tokens", 16)
    assert json.loads((art / "manifest.json").read_text())["model"]["router"]["threshold"] == 0.0
    ran = json.loads(run("run", art, "--prompt", "def f(", "-n", 10, "--json").output)
    assert ran["stats"]["drafted"] == 0 and ran["stats"]["steps"] == 9  # the prefill emits the first token
    refused = run("export", tiny, "--target", "cpu", "-o", tmp_path / "speed", "--router-threshold", 0.5, ok=False)
    assert refused.exit_code == 2 and "applies to --mode adaptive" in refused.output
    assert not (tmp_path / "speed").exists()


def test_run_profile_splits_step_time_by_scope(tiny, tmp_path):
    """`run --profile` leaves ONNX Runtime's traces and says which part of a step took the time: each draft, the
    primary's verification and the tandem cache write are named scopes in the graph."""
    art = tmp_path / "cpu"
    run("export", tiny, "--target", "cpu", "-o", art, "--max-seq-len", 64, "--prefill-chunk", 16, "-g", 2,
        "--max-new-tokens", 16, "--no-verify")
    result = run("run", art, "--prompt", "def f(", "-n", 12, "--profile", tmp_path / "traces", "--threads", 1)
    step = next(line for line in result.stderr.splitlines() if line.startswith("step.s64:"))
    scopes = result.stderr.split(step)[1].splitlines()[1]
    assert all(name in scopes for name in ("verify", "draft0", "draft1", "tandem_kv"))
    from tandemc.profiling import summarize

    summary = summarize(next((tmp_path / "traces").glob("step.s64*.json")))
    assert summary["runs"] >= 12 // 3 and set(summary["by_scope"]) >= {"verify", "draft0", "draft1", "tandem_kv"}
    assert abs(sum(summary["by_scope"].values()) - summary["kernel_ms_per_run"]) < 0.01
    refused = run("run", art, "--prompt", "x", "--profile", tmp_path / "t2", "--backend", "savedmodel", ok=False)
    assert refused.exit_code != 0 and "profiling uses ONNX Runtime" in refused.output


def test_cpu_manifest_lists_what_each_graph_reads_and_onnx_runtime_loads_it_silently(tiny, tmp_path):
    """docs/artifact.md: an ONNX graph's `weights` are the external initializers its file reads; no graph carries
    an initializer nothing reads (ONNX Runtime would warn on every load); the versions are recorded."""
    import onnx
    import onnxruntime

    art = tmp_path / "cpu"
    run("export", tiny, "--target", "cpu", "-o", art, "--max-seq-len", 48, "--prefill-chunk", 16,
        "--max-new-tokens", 8, "--verify-prompts", 1)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["versions"] == {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}

    def reads_of(graph):  # including what nested branches and loop bodies read from outer scopes
        return {name for node in graph.node for name in node.input} | {
            n for node in graph.node for a in node.attribute if a.type == onnx.AttributeProto.GRAPH
            for n in reads_of(a.g)}

    def unread(graph):  # initializers of the graph and its subgraphs that nothing reads
        reads = reads_of(graph)
        return [t.name for t in graph.initializer if t.name not in reads] + [
            n for node in graph.node for a in node.attribute if a.type == onnx.AttributeProto.GRAPH
            for n in unread(a.g)]

    for key, entry in manifest["graphs"].items():
        model = onnx.load(art / entry["onnx"], load_external_data=False)
        external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert external == entry["weights"], key
        if entry["name"] == "prefill":
            assert not any(w.startswith("drafter.") for w in entry["weights"])
        assert unread(model.graph) == [], key
    load = ("import onnxruntime as ort, sys\n"
            "for f in sys.argv[1:]: ort.InferenceSession(f, providers=['CPUExecutionProvider'])\n")
    proc = subprocess.run([sys.executable, "-c", load, *sorted(map(str, art.glob("*.onnx")))], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]


@pytest.mark.parametrize("target, dtype", [("cpu", "bfloat16"), ("gpu", "bfloat16")])
def test_export_refuses_a_dtype_its_target_cannot_verify_in_one_line(tiny, tmp_path, target, dtype):
    result = run("export", tiny, "--target", target, "-o", tmp_path / "art", "--dtype", dtype, ok=False)
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: --dtype {dtype} is not available for the {target} target (ONNX Runtime, "
                                     f"which runs and verifies its graphs, has no {dtype} kernels for them): use "
                                     f"float32 or float16, or --target tpu for {dtype}")
    assert not (tmp_path / "art").exists()
