"""examples/node: a second-language consumer (onnxruntime-node, no Python) gives `tandemc run`'s tokens and text,
greedy and sampled, from docs/artifact.md and the manifest alone. Skipped where `node` and `npm` are not on the
PATH; onnxruntime-node is installed once per package.json into the test cache (npm install --ignore-scripts)."""

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import compilation_cache_dir
from tandemc.cli import cli

EXAMPLE = Path(__file__).parent.parent / "examples" / "node"

pytestmark = pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None,
                                reason="node and npm are not on the PATH")


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def consumer():
    """generate.mjs with its pinned onnxruntime-node installed beside it (outside the checkout)."""
    package = (EXAMPLE / "package.json").read_bytes()
    home = compilation_cache_dir().parent / f"node-{hashlib.sha256(package).hexdigest()[:12]}"
    if not (home / "node_modules" / "onnxruntime-node").is_dir():
        home.mkdir(parents=True, exist_ok=True)
        (home / "package.json").write_bytes(package)
        proc = subprocess.run(["npm", "install", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=home,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"npm install failed: {proc.stderr[-2000:]}"
    shutil.copyfile(EXAMPLE / "generate.mjs", home / "generate.mjs")
    return home / "generate.mjs"


def node(script, *args, ok=True):
    proc = subprocess.run(["node", str(script), *map(str, args)], capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def artifacts(tiny_checkpoint, tmp_path_factory):
    """Two CPU artifacts of the tiny byte-level checkpoint: primary mode with batch 2 and two buckets (float
    weights), and speed mode with -O3 (int8 activations: the manifest's onnx_session_config must be honoured)."""
    root = tmp_path_factory.mktemp("node")
    run("export", tiny_checkpoint, "--target", "cpu", "-o", root / "primary", "--mode", "primary", "--batch", 2,
        "--max-seq-len", "48,96", "--prefill-chunk", 16, "--verify-prompts", 1)
    run("export", tiny_checkpoint, "--target", "cpu", "-o", root / "speed", "--mode", "speed", "-g", 3, "-O", 3,
        "--max-seq-len", 96, "--prefill-chunk", 16, "--verify-prompts", 1)
    return root


@pytest.mark.parametrize("name", ["primary", "speed"])
@pytest.mark.parametrize("sampling", [[], ["-t", "0.8", "--top-p", "0.95", "--seed", "7"],
                                      ["-t", "1.3", "--top-k", "5", "--seed", "-3"]],
                         ids=["greedy", "top-p", "top-k-negative-seed"])
def test_node_consumer_gives_tandemc_runs_tokens(consumer, artifacts, name, sampling):
    art = artifacts / name
    for prompt, n in (("def f(x):", 20), ("é" * 25, 40)):  # the second needs the larger bucket (BOS counts)
        want = json.loads(run("run", art, "--prompt", prompt, "-n", n, *sampling, "--json").output)
        got = json.loads(node(consumer, art, "--prompt", prompt, "-n", n, *sampling, "--json").stdout)
        assert got["tokens"] == want["tokens"]
        assert got["text"] == want["text"]
        if name == "speed":
            assert got["stats"]["drafted"] > 0


def test_node_consumer_refuses_a_modified_artifact_in_one_line(consumer, artifacts, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(artifacts / "primary", art)
    with open(art / "weights.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    proc = node(consumer, art, "--prompt", "x", ok=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "sha256" in proc.stderr and len(proc.stderr.splitlines()) == 1
