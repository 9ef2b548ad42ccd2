"""Hostile and broken inputs through the CLI, table-driven: each case must exit 2 (1 for a failed verification)
with a single `error:` line, no traceback, and leave every file outside its output path unchanged.

Categories and their cases (pytest ids):
- safetensors (24): files the reference reader (`safetensors` package) refuses are refused too, a tensor named
  twice (stricter than the reference), and the valid file read as the reference reads it;
- artifacts (72): 36 tamperings, each through `run` and `verify` — manifests that point outside the artifact,
  symlinks, unlisted or missing files, ONNX external data outside the artifact, corrupt graph files, manifests of
  another format or schema, and manifests edited to describe other graphs than they hold (mode, block length,
  batch, chunk, buckets, vocabulary, wiring, inputs and outputs) or with missing and wrongly typed fields;
- outputs (11): exports, `export-hf` and `detach` that would overwrite their input, the current directory or a
  file;
- overwrites (2): a crash between the two renames of an overwrite is repaired by the next write; --force
  replaces the whole directory;
- options, configs and prompts (27, and a tpu artifact with a wrong backend, signature or module): sampling
  values, pass options, configs (nesting, NaN, impossible sizes, unknown fields), non-UTF-8 prompts, prompt counts,
  a checkpoint run as an artifact;
- faults (4): a full disk (ENOSPC, a private tmpfs), an output directory without write permission (EACCES),
  kill -9 during an overwrite (the old artifact survives whole, the next export cleans up), two exports to one
  path at once (one complete artifact, no leftovers).
"""

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import tree_digest
from tandemc.cli import cli


def cli_run(*args, cwd=None):
    old = os.getcwd()
    if cwd:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        os.chdir(old)


def assert_one_line_error(result, code=2, contains=""):
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    assert contains in lines[0], lines[0]


# --- safetensors ----------------------------------------------------------------------------------------------

def safetensors_file(header: dict, data: bytes, raw_header: bytes | None = None) -> bytes:
    blob = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "I32", "shape": [1], "data_offsets": [8, 12]}}
DATA = np.arange(3, dtype=np.float32).tobytes()

SAFETENSORS_CASES = {
    "junk after the data": safetensors_file(GOOD, DATA + b"junk"),
    "gap between tensors": safetensors_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                             "b": {"dtype": "I32", "shape": [1], "data_offsets": [12, 16]}},
                                            DATA + b"\0" * 4),
    "overlapping tensors": safetensors_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                             "b": {"dtype": "I32", "shape": [1], "data_offsets": [4, 8]}}, DATA[:8]),
    "offsets not starting at zero": safetensors_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                                                     DATA),
    "span shorter than the shape": safetensors_file({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
                                                    DATA[:8]),
    "truncated data": safetensors_file(GOOD, DATA[:10]),
    "string offsets": safetensors_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, DATA[:8]),
    "float offsets": safetensors_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, DATA[:8]),
    "offsets not a list": safetensors_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": 8}}, DATA[:8]),
    "reversed offsets": safetensors_file({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, DATA[:8]),
    "negative dimension": safetensors_file({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, DATA[:8]),
    "string shape": safetensors_file({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, DATA[:8]),
    "boolean dimension": safetensors_file({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}},
                                          DATA[:8]),
    "unknown dtype": safetensors_file({"a": {"dtype": "F31", "shape": [2], "data_offsets": [0, 8]}}, DATA[:8]),
    "entry missing its dtype": safetensors_file({"a": {"shape": [2], "data_offsets": [0, 8]}}, DATA[:8]),
    "entry not an object": safetensors_file({"a": [1, 2]}, DATA[:8]),
    "header a list": safetensors_file({}, b"", raw_header=b"[1, 2]  "),
    "header not JSON": safetensors_file({}, DATA, raw_header=b"{not json"),
    "metadata not strings": safetensors_file({"__metadata__": {"k": 1}, **GOOD}, DATA),
    "header longer than the file": struct.pack("<Q", 10 ** 6) + b"{}",
    "deeply nested header": safetensors_file({}, b"", raw_header=b"[" * 100000 + b"]" * 100000),
    "empty file": b"",
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS_CASES))
def test_safetensors_the_reference_refuses_are_refused(case, tmp_path):
    """The checkpoint loader's reader against the `safetensors` package on the same bytes: both refuse."""
    from safetensors.numpy import load_file

    from tandemc import safetensors_io
    from tandemc.errors import TandemcError

    path = tmp_path / "model.safetensors"
    path.write_bytes(SAFETENSORS_CASES[case])
    with pytest.raises(Exception):
        load_file(str(path))
    with pytest.raises(TandemcError) as error:
        safetensors_io.read(path)
    assert "\n" not in str(error.value) and path.name in str(error.value)


def test_a_tensor_named_twice_is_refused(tmp_path):
    """Stricter than the reference, which keeps the last of two entries with one name: which one a writer meant
    is unknowable, so tandemc refuses the file."""
    from tandemc import safetensors_io
    from tandemc.errors import TandemcError

    path = tmp_path / "model.safetensors"
    entry = b'{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
    path.write_bytes(safetensors_file({}, DATA[:8], raw_header=b'{"a":' + entry + b',"a":' + entry + b"}"))
    with pytest.raises(TandemcError, match="duplicate key 'a'"):
        safetensors_io.read(path)


def test_the_valid_file_behind_the_cases_is_read_as_the_reference_reads_it(tmp_path):
    from safetensors.numpy import load_file

    from tandemc import safetensors_io

    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_file(GOOD, DATA))
    ours, theirs = safetensors_io.read(path), load_file(str(path))
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)


# --- artifacts ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cpu_artifact(tiny_checkpoint, tmp_path_factory):
    art = tmp_path_factory.mktemp("bad") / "art"
    result = cli_run("export", tiny_checkpoint, "--target", "cpu", "-o", art, "--mode", "primary", "--max-seq-len",
                     48, "--prefill-chunk", 16, "--max-new-tokens", 8, "--no-verify")
    assert result.exit_code == 0, result.output
    return art


def edit_manifest(art: Path, edit) -> None:
    manifest = json.loads((art / "manifest.json").read_text())
    edit(manifest)
    (art / "manifest.json").write_text(json.dumps(manifest))


def relist(manifest, old, new):
    manifest["files"][new] = manifest["files"].pop(old)


def point_graph(manifest, value):
    entry = manifest["graphs"]["prefill.s48"]
    relist(manifest, entry["onnx"], value)
    entry["onnx"] = value


def outside_external_data(art: Path):
    """The prefill graph's first external initializer reads a sibling directory's copy of the weights."""
    import onnx

    from tandemc.artifact import sha256

    shutil.copyfile(art / "weights.safetensors", art.parent / "outside.safetensors")
    model = onnx.load(art / "prefill.s48.onnx", load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    next(e for e in tensor.external_data if e.key == "location").value = "../outside.safetensors"
    onnx.save(model, art / "prefill.s48.onnx")
    edit_manifest(art, lambda m: m["files"].update({"prefill.s48.onnx": sha256(art / "prefill.s48.onnx")}))


def symlinked_weights(art: Path):
    shutil.copyfile(art / "weights.safetensors", art.parent / "real.safetensors")
    (art / "weights.safetensors").unlink()
    (art / "weights.safetensors").symlink_to(art.parent / "real.safetensors")


def unhashed_graph(art: Path):
    (art / "other.onnx").write_bytes((art / "prefill.s48.onnx").read_bytes())
    edit_manifest(art, lambda m: m["graphs"]["prefill.s48"].update(onnx="other.onnx"))


def truncated_graph(art: Path):
    from tandemc.artifact import sha256

    data = (art / "prefill.s48.onnx").read_bytes()
    (art / "prefill.s48.onnx").write_bytes(data[:len(data) // 2])
    edit_manifest(art, lambda m: m["files"].update({"prefill.s48.onnx": sha256(art / "prefill.s48.onnx")}))


ARTIFACT_CASES = {
    "listed file ../outside": (lambda art: edit_manifest(art, lambda m: m["files"].update(
        {"../outside.txt": "0" * 64})), "not a plain relative path"),
    "listed absolute path": (lambda art: edit_manifest(art, lambda m: m["files"].update(
        {"/etc/hostname": "0" * 64})), "not a plain relative path"),
    "listed path with a dot part": (lambda art: edit_manifest(art, lambda m: relist(
        m, "step.s48.onnx", "./step.s48.onnx")), "not a plain relative path"),
    "graph file outside": (lambda art: edit_manifest(art, lambda m: point_graph(m, "../art/prefill.s48.onnx")),
                           "not a plain relative path"),
    "graph file absolute": (lambda art: edit_manifest(art, lambda m: point_graph(m, str(art / "prefill.s48.onnx"))),
                            "not a plain relative path"),
    "weights file outside": (lambda art: edit_manifest(art, lambda m: m.update(weights_file="../w.safetensors")),
                             "not a plain relative path"),
    "graph file not hashed": (unhashed_graph, "not among the manifest's hashed files"),
    "unlisted extra file": (lambda art: (art / "extra.bin").write_bytes(b"x"), "not listed in the manifest"),
    "missing graph file": (lambda art: (art / "step.s48.onnx").unlink(), "is missing"),
    "modified weights": (lambda art: (art / "weights.safetensors").open("r+b").write(b"\1"), "sha256"),
    "files table not an object": (lambda art: edit_manifest(art, lambda m: m.update(files=["weights.safetensors"])),
                                  "'files' table"),
    "digest not a string": (lambda art: edit_manifest(art, lambda m: m["files"].update(
        {"weights.safetensors": 5})), "'files' table"),
    "symlinked weights": (symlinked_weights, "symbolic link"),
    "external data outside": (outside_external_data, "outside the artifact"),
    "truncated graph": (truncated_graph, "not a readable ONNX graph"),
    "manifest not JSON": (lambda art: (art / "manifest.json").write_text("{"), "not valid JSON"),
    "manifest another format": (lambda art: edit_manifest(art, lambda m: m.update(format="x")), "format"),
    "manifest newer schema": (lambda art: edit_manifest(art, lambda m: m.update(schema_version=2)),
                              "schema_version"),
}


def in_graph(key, edit):
    return lambda art: edit_manifest(art, lambda m: edit(m["graphs"][key]))


def rename_last_input(entry):  # a sampling control: nothing but the graph file itself says its name
    entry["inputs"][-1]["name"] = "renamed"


def drop_last_output(entry):
    entry["outputs"].pop()


def widen_first_input(entry):
    entry["inputs"][0]["shape"][0] += 1


ARTIFACT_CASES.update({  # manifests edited to describe other graphs than they hold
    "mode changed to speed": (lambda art: edit_manifest(art, lambda m: m["decode"].update(
        mode="speed", block_length=4, block_lengths=[4])), "decode settings"),
    "block length in primary mode": (lambda art: edit_manifest(art, lambda m: m["decode"].update(block_length=2)),
                                     "0 in primary mode"),
    "batch changed": (lambda art: edit_manifest(art, lambda m: m["decode"].update(batch=3)), "decode settings"),
    "prefill chunk changed": (lambda art: edit_manifest(art, lambda m: m["decode"].update(prefill_chunk=8)),
                              "decode settings"),
    "bucket changed": (lambda art: edit_manifest(art, lambda m: m["decode"].update(cache_buckets=[64])),
                       "has no graph prefill.s64"),
    "vocabulary changed": (lambda art: edit_manifest(art, lambda m: m["model"]["primary"].update(vocab_size=300)),
                           "model"),
    "decode missing": (lambda art: edit_manifest(art, lambda m: m.pop("decode")), "'decode'"),
    "batch a string": (lambda art: edit_manifest(art, lambda m: m["decode"].update(batch="1")), "decode.batch"),
    "eos id a string": (lambda art: edit_manifest(art, lambda m: m["tokenizer"].update(eos_id="257")),
                        "tokenizer.eos_id"),
    "no graphs": (lambda art: edit_manifest(art, lambda m: m.update(graphs={})), "'graphs'"),
    "graph key not its name": (lambda art: edit_manifest(art, lambda m: m["graphs"].update(
        {"prefill.s99": m["graphs"].pop("prefill.s48")})), "has no graph prefill.s48"),
    "state wired to no input": (in_graph("step.s48", lambda e: e["state"].update({"emitted": "nothing"})),
                                "graphs.step.s48.state"),
    "input shape not a list": (in_graph("step.s48", lambda e: e["inputs"][0].update(shape="1")),
                               "graphs.step.s48.inputs[0]"),
    "input renamed": (in_graph("step.s48", rename_last_input), "not the ones its manifest entry lists"),
    "output dropped": (in_graph("step.s48", drop_last_output), "does not describe"),
    "input widened": (in_graph("prefill.s48", widen_first_input), "does not describe"),
    "graph name not its key": (in_graph("step.s48", lambda e: e.update(name="prefill")), "seq_len"),
    "step graph not listed": (lambda art: edit_manifest(art, lambda m: m["graphs"].pop("step.s48")),
                              "has no graph step.s48"),
    "block lengths claim a graph": (lambda art: edit_manifest(art, lambda m: m["decode"].update(
        block_lengths=[0, 2])), "has no graph step_g2.s48"),
    "block lengths without the default": (lambda art: edit_manifest(art, lambda m: m["decode"].update(
        block_lengths=[1])), "decode.block_lengths"),
    "block lengths not a list": (lambda art: edit_manifest(art, lambda m: m["decode"].update(block_lengths="0")),
                                 "decode.block_lengths"),
})


@pytest.mark.parametrize("case", sorted(ARTIFACT_CASES))
@pytest.mark.parametrize("command", ["run", "verify"])
def test_artifacts_are_closed_and_checked(case, command, cpu_artifact, tiny_checkpoint, tmp_path):
    root = tmp_path / "root"
    art = root / "art"
    shutil.copytree(cpu_artifact, art)
    tamper, message = ARTIFACT_CASES[case]
    tamper(art)
    before = tree_digest(root)
    args = (["run", art, "--prompt", "x", "-n", 2] if command == "run"
            else ["verify", art, "--checkpoint", tiny_checkpoint, "--prompts", 1])
    assert_one_line_error(cli_run(*args), contains=message)
    assert tree_digest(root) == before


# --- outputs --------------------------------------------------------------------------------------------------

@pytest.fixture
def own_checkpoint(tiny_checkpoint, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, path)
    return path


OUTPUT_CASES = {
    "the input checkpoint": (lambda ckpt: ckpt, "overlaps the input"),
    "inside the input": (lambda ckpt: ckpt / "art", "overlaps the input"),
    "containing the input": (lambda ckpt: ckpt.parent, "current directory or contains it"),
    "the current directory": (lambda ckpt: Path("."), "current directory or contains it"),
    "the parent directory": (lambda ckpt: Path(".."), "current directory or contains it"),
    "an existing file": (lambda ckpt: ckpt.parent / "file.txt", "not a directory"),
    "under a file": (lambda ckpt: ckpt.parent / "file.txt" / "art", "cannot create"),
}


@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
def test_export_never_overwrites_its_input_or_the_working_directory(case, own_checkpoint):
    root = own_checkpoint.parent
    (root / "file.txt").write_text("keep me")
    out, message = OUTPUT_CASES[case]
    before = tree_digest(root)
    result = cli_run("export", own_checkpoint, "--target", "cpu", "-o", out(own_checkpoint), "--force",
                     "--no-verify", cwd=root)
    assert_one_line_error(result, contains=message)
    assert tree_digest(root) == before


# --- overwrites -----------------------------------------------------------------------------------------------

def test_an_overwrite_interrupted_between_its_renames_is_repaired_by_the_next_write(cpu_artifact, tiny_checkpoint,
                                                                                     tmp_path):
    """Where the system cannot swap two directories in one step, an overwrite moves the old artifact to
    `.NAME.old-*` and then renames the new one in; a crash in between leaves no artifact at the path. The next
    write puts the old one back first (here: refusing to overwrite it without --force, so it is intact)."""
    art = tmp_path / "art"
    moved = tmp_path / ".art.old-12345"
    shutil.copytree(cpu_artifact, moved)
    result = cli_run("export", tiny_checkpoint, "--target", "cpu", "-o", art, "--no-verify")
    assert_one_line_error(result, contains="already exists")
    assert not moved.exists() and tree_digest(art) == tree_digest(cpu_artifact)
    assert cli_run("run", art, "--prompt", "x", "-n", 2).exit_code == 0


def test_forced_overwrite_replaces_the_artifact_whole(cpu_artifact, tiny_checkpoint, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(cpu_artifact, art)
    (art / "stale.txt").write_text("from the old artifact")
    result = cli_run("export", tiny_checkpoint, "--target", "cpu", "-o", art, "--force", "--mode", "primary",
                     "--max-seq-len", 32, "--prefill-chunk", 16, "--max-new-tokens", 8, "--no-verify")
    assert result.exit_code == 0, result.output
    assert not (art / "stale.txt").exists()
    assert json.loads((art / "manifest.json").read_text())["decode"]["cache_buckets"] == [32]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no hidden leftovers



# --- options, configs and prompts -----------------------------------------------------------------------------

def config_edit(edit):
    def apply(ckpt: Path):
        config = json.loads((ckpt / "config.json").read_text())
        edit(config)
        (ckpt / "config.json").write_text(json.dumps(config))
    return apply


def raw_config(text):
    return lambda ckpt: (ckpt / "config.json").write_text(text)


def nan_theta(c):
    c["primary"]["rope_theta"] = float("nan")


def export_passes(spec):
    return ["export", "{ckpt}", "--target", "cpu", "-o", "{out}", "--passes", spec]


COMMAND_CASES = {  # (edit the checkpoint copy or None, args after the checkpoint path, message)
    "init negative seed": (None, ["init", "{out}", "--preset", "tiny", "--seed", "-1"], "-1"),
    "temperature nan": (None, ["generate", "{ckpt}", "--prompt", "x", "-t", "nan"], "finite --temperature"),
    "temperature negative": (None, ["generate", "{ckpt}", "--prompt", "x", "-t", "-1"], "--temperature"),
    "top-p zero": (None, ["generate", "{ckpt}", "--prompt", "x", "--top-p", "0"], "--top-p"),
    "top-p above one": (None, ["generate", "{ckpt}", "--prompt", "x", "--top-p", "1.5"], "--top-p"),
    "top-k negative": (None, ["generate", "{ckpt}", "--prompt", "x", "--top-k", "-2"], "--top-k"),
    "prompt not UTF-8": (None, ["generate", "{ckpt}", "--prompt", "a\udcff"], "not valid UTF-8"),
    "evaluate zero prompts": (None, ["evaluate", "{ckpt}", "--prompts", "0"], "--prompts"),
    "verify zero prompts": (None, ["verify", "{ckpt}", "--checkpoint", "{ckpt}", "--prompts", "0"], "--prompts"),
    "verify negative prompts": (None, ["verify", "{ckpt}", "--checkpoint", "{ckpt}", "--prompts", "-1"],
                                "--prompts"),
    "run a checkpoint as an artifact": (None, ["run", "{ckpt}", "--prompt", "x"], "manifest.json"),
    "pass option not an integer": (None, export_passes("quantize_int8:block=abc"), "must be an integer"),
    "pass option unknown": (None, export_passes("fuse_qkv:foo=1"), "has no option 'foo'"),
    "pass option fixed by the name": (None, export_passes("quantize_int8:bits=3"), "has no option 'bits'"),
    "pass block not a kernel block": (None, export_passes("quantize_int4:block=7"), "block=7"),
    "pass keep names nothing": (None, export_passes("quantize_int8:keep=nonsense"), "keep='nonsense'"),
    "pass option without a value": (None, export_passes("quantize_int8:block"), "key=value"),
    "unknown pass": (None, export_passes("fuse_all"), "unknown pass"),
    "block lengths in primary mode": (None, ["export", "{ckpt}", "--target", "cpu", "-o", "{out}", "--mode",
                                             "primary", "--block-lengths", "0,1"], "needs a drafting mode"),
    "block lengths out of range": (None, ["export", "{ckpt}", "--target", "cpu", "-o", "{out}", "--block-lengths",
                                          "1,65"], "in 0..64"),
    "block lengths not integers": (None, ["export", "{ckpt}", "--target", "cpu", "-o", "{out}", "--block-lengths",
                                          "1,two"], "--block-lengths takes integers"),
    "config nested too deeply": (raw_config('{"a":' * 100000 + "1" + "}" * 100000),
                                 ["inspect", "{ckpt}"], "nested too deeply"),
    "config not JSON": (raw_config("{"), ["inspect", "{ckpt}"], "config"),
    "config NaN theta": (config_edit(nan_theta), ["inspect", "{ckpt}"], "finite"),
    "config d_model not divisible": (config_edit(lambda c: c["primary"].update(d_model=250, head_dim=0)),
                                     ["inspect", "{ckpt}"], "not divisible"),
    "config impossible size": (config_edit(lambda c: c["primary"].update(d_model=2 ** 40, head_dim=64)),
                               ["generate", "{ckpt}", "--prompt", "x"], "primary.embed"),
    "config unknown field": (config_edit(lambda c: c.update(colour="blue")), ["inspect", "{ckpt}"], "colour"),
    "config negative layers": (config_edit(lambda c: c["primary"].update(n_layers=-1)), ["inspect", "{ckpt}"],
                               "n_layers"),
    "checkpoint missing": (lambda ckpt: shutil.rmtree(ckpt), ["inspect", "{ckpt}"], ""),
    "weights truncated": (lambda ckpt: (ckpt / "model.safetensors").write_bytes(
        (ckpt / "model.safetensors").read_bytes()[:100]), ["inspect", "{ckpt}"], "model.safetensors"),
}


@pytest.mark.parametrize("case", sorted(COMMAND_CASES))
def test_bad_options_configs_and_prompts_are_one_line(case, own_checkpoint):
    edit, args, message = COMMAND_CASES[case]
    if edit:
        edit(own_checkpoint)
    root = own_checkpoint.parent
    before = tree_digest(root)
    out = root / "out"
    result = cli_run(*[a.format(ckpt=own_checkpoint, out=out) for a in args])
    assert_one_line_error(result, contains=message)
    assert tree_digest(root) == before and not out.exists()


def test_tpu_artifact_with_a_wrong_backend_signature_or_module_is_one_line(tiny_checkpoint, tmp_path):
    art = tmp_path / "tpu"
    assert cli_run("export", tiny_checkpoint, "--target", "tpu", "-o", art, "--max-seq-len", 32, "--prefill-chunk",
                   16, "--max-new-tokens", 8, "--platforms", "cpu", "--no-verify").exit_code == 0
    assert_one_line_error(cli_run("run", art, "--prompt", "x", "--backend", "onnxruntime"),
                          contains="does not run tpu artifacts")
    edit_manifest(art, lambda m: m["graphs"]["step.s32"]["inputs"][-1].update(shape=[1]))  # eos_id is a scalar
    assert_one_line_error(cli_run("run", art, "--prompt", "x"), contains="not the ones its manifest entry lists")
    (art / "step.s32.jaxexport").write_bytes(b"not a module")
    edit_manifest(art, lambda m: m["files"].update({"step.s32.jaxexport": __import__("hashlib").sha256(
        b"not a module").hexdigest()}))
    assert_one_line_error(cli_run("run", art, "--prompt", "x"), contains="not a readable jax.export module")


@pytest.mark.parametrize("command", ["export-hf", "detach"])
def test_other_writers_never_overwrite_their_input(command, own_checkpoint):
    root = own_checkpoint.parent
    before = tree_digest(root)
    for out in (own_checkpoint, own_checkpoint / "inner"):
        assert_one_line_error(cli_run(command, own_checkpoint, "-o", out, "--force"))
    assert tree_digest(root) == before


# --- faults ---------------------------------------------------------------------------------------------------

def export_command(ckpt, out, *extra):
    import sys

    return [sys.executable, "-m", "tandemc.cli", "export", str(ckpt), "--target", "cpu", "-o", str(out), "--mode",
            "primary", "--max-seq-len", "48", "--prefill-chunk", "16", "--max-new-tokens", "8", *extra]


def test_kill_9_during_an_overwrite_leaves_the_old_artifact_and_the_next_export_cleans_up(cpu_artifact,
                                                                                           tiny_checkpoint, tmp_path):
    import signal
    import subprocess
    import time

    art = tmp_path / "art"
    shutil.copytree(cpu_artifact, art)
    before = tree_digest(art)
    proc = subprocess.Popen(export_command(tiny_checkpoint, art, "--force"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".art.tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the export ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert tree_digest(art) == before  # the old artifact, whole
    assert list(tmp_path.glob(".art.tmp-*"))  # what the killed writer left
    result = cli_run("export", tiny_checkpoint, "--target", "cpu", "-o", art, "--force", "--mode", "primary",
                     "--max-seq-len", 32, "--prefill-chunk", 16, "--max-new-tokens", 8, "--no-verify")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_two_exports_to_one_path_at_once_leave_one_complete_artifact(tiny_checkpoint, tmp_path):
    import subprocess

    art = tmp_path / "art"
    procs = [subprocess.Popen(export_command(tiny_checkpoint, art, "--force", "--no-verify"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in outcomes), outcomes
    from tandemc.artifact import read_manifest

    read_manifest(art)  # complete: every file listed and matching its hash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_checkpoint, tmp_path):
    """ENOSPC: the export writes into a 256 KiB tmpfs mounted in a private mount namespace (unshare), fails with one
    line naming the error, and leaves nothing on that file system."""
    import subprocess
    import sys

    if shutil.which("unshare") is None:
        pytest.skip("unshare is not on the PATH: no private tmpfs to fill")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size=256k tmpfs {disk} || exit 99; "
              f"{sys.executable} -m tandemc.cli export {tiny_checkpoint} --target cpu -o {disk}/art --mode primary "
              f"--max-seq-len 48 --prefill-chunk 16 --max-new-tokens 8 --no-verify; echo rc=$?; ls -A {disk}")
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 99 or "rc=" not in proc.stdout:
        pytest.skip(f"cannot mount a private tmpfs here: {proc.stderr.strip()[:200]}")
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.stdout.splitlines()[0] == "rc=2" and proc.stdout.splitlines()[1:] == [], proc.stdout
    assert len(errors) == 1 and errors[0].startswith("error: ") and "No space left on device" in errors[0], errors


def test_an_output_directory_without_write_permission_is_one_line(tiny_checkpoint, tmp_path):
    """EACCES: `init` into a directory of mode 555, run as an unprivileged user (an unshare'd user namespace: root
    ignores permissions)."""
    import subprocess
    import sys

    if shutil.which("unshare") is None:
        pytest.skip("unshare is not on the PATH: no unprivileged user to run as")
    root = tmp_path / "perm"
    root.mkdir()
    (root / "ro").mkdir(mode=0o555)
    os.chmod(tmp_path, 0o755)
    os.chmod(root, 0o755)
    proc = subprocess.run(["unshare", "--user", sys.executable, "-m", "tandemc.cli", "init", str(root / "ro" / "new"),
                           "--preset", "tiny"], capture_output=True, text=True, timeout=300)
    if proc.returncode == 0 or "unshare" in proc.stderr:
        pytest.skip(f"permissions are not enforced for this user here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1
    assert "Permission denied" in proc.stderr and list((root / "ro").iterdir()) == []
