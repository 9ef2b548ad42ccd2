"""Shared helpers: random tandem configurations and their parameters."""

import dataclasses
import os
from importlib.metadata import version
from pathlib import Path

# Tests compile many small graphs; LLVM's optimisation level changes compile time, not semantics.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")


def compilation_cache_dir() -> Path:
    """JAX's persistent compilation cache for the tests: outside the checkout (fresh clones on one machine share
    it) and keyed by the jax/jaxlib versions (an upgrade starts a new one; XLA's own key covers flags and HLO).
    Compiling is most of the suite's time: a warm cache takes test_speed.py from 203 s to 57 s."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "tandemc-tests" / f"jax-{version('jax')}-jaxlib-{version('jaxlib')}"


# Environment variables rather than jax.config, so the subprocess tests (8 simulated devices, TensorFlow) share
# the cache too. Every program is cached, however quick to compile; the cache is bounded and evicts the least
# recently used entries.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(compilation_cache_dir()))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tandemc.config import DecoderConfig, RouterConfig, TandemConfig
from tandemc.params import init_params


def decoder(vocab, d_model, n_layers, n_heads, n_kv_heads, head_dim, tie=False, max_seq_len=128):
    return DecoderConfig(vocab, d_model, n_layers, n_heads, n_kv_heads, d_ff=2 * d_model, head_dim=head_dim,
                         tie_embeddings=tie, max_seq_len=max_seq_len)


# Shapes that stress the model: odd head counts, several GQA ratios, L_S not dividing L_L, tied and untied
# embeddings, head_dim * n_heads != d_model. Small vocabularies make random drafts agree with the primary often
# enough to exercise acceptance. custom-map also carries the primary-state-input variant.
CONFIGS = {
    "mha-odd-heads": TandemConfig(decoder(5, 24, 3, 3, 3, 8), decoder(5, 12, 2, 3, 1, 4, tie=True),
                                  drafter=decoder(5, 12, 2, 3, 1, 4)),
    "gqa-4to2": TandemConfig(decoder(6, 32, 2, 4, 2, 8, tie=True), decoder(6, 16, 1, 2, 2, 8),
                             drafter=decoder(6, 16, 1, 2, 1, 8)),
    "mqa-5to1": TandemConfig(decoder(7, 40, 2, 5, 1, 6), decoder(7, 20, 2, 5, 1, 4), gamma_train=3),
    "custom-map": TandemConfig(decoder(6, 32, 3, 6, 3, 6), decoder(6, 16, 2, 1, 1, 10, tie=True),
                               layer_map=(0, 0), router=RouterConfig(top_k=3, hidden=8), primary_state_input=8,
                               primary_state_logits=True),
    # The drafters propose only 5 of the primary's 9 tokens (ids 0..4 until chosen) and read the rest as one id.
    # Its primary-state MLP reads both primary layers (primary_state_layers), and each draft after a block's first
    # feeds the next its own state (primary_state_feedback).
    "draft-vocab": TandemConfig(decoder(9, 32, 2, 4, 2, 8, tie=True), decoder(6, 16, 2, 2, 1, 8, tie=True),
                                drafter=decoder(6, 16, 1, 2, 1, 8), draft_vocab=5, primary_state_input=8,
                                primary_state_layers=(0, 1), primary_state_feedback=True),
    # The drafters read and write tokens through the primary's table (over 5 draft tokens of 9, and a router).
    "shared-table": TandemConfig(decoder(9, 32, 2, 4, 2, 8, tie=True), decoder(6, 16, 2, 2, 1, 8),
                                 drafter=decoder(6, 16, 1, 2, 1, 8), draft_vocab=5, shared_embeddings=True,
                                 router=RouterConfig(top_k=3, hidden=8)),
}


def make(cfg: TandemConfig, seed: int = 0):
    cfg = cfg.validate()
    return cfg, jax.tree.map(jnp.asarray, init_params(cfg, seed))


@pytest.fixture(params=sorted(CONFIGS))
def tandem(request):
    # One fixed seed (never str hash(), which is salted per process). Random tiny models often draft a single
    # token forever; with this seed every shape's drafts are accepted sometimes, which test_speed asserts.
    return make(CONFIGS[request.param], seed=1)


def with_drafter_as_primary(cfg: TandemConfig, params, noise: float = 0.0, seed: int = 0):
    """A standalone drafter that is a (noisy) copy of the primary: full or partial acceptance on demand."""
    rng = np.random.default_rng(seed)
    drafter = jax.tree.map(lambda x: x + noise * jnp.asarray(rng.standard_normal(x.shape), x.dtype), params["primary"])
    return dataclasses.replace(cfg, drafter=cfg.primary), {**params, "drafter": drafter}


def random_prompts(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def tree_digest(root: Path) -> dict[str, str]:
    import hashlib

    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The `tiny` preset (seed 1) on disk, written once per test process by `tandemc init` and shared by every test
    that only reads a checkpoint. Read-only: a test that changed it would fail here, at the end of the session."""
    from click.testing import CliRunner

    from tandemc.cli import cli

    path = tmp_path_factory.mktemp("shared") / "tiny"
    result = CliRunner().invoke(cli, ["init", str(path), "--preset", "tiny", "--seed", "1"])
    assert result.exit_code == 0, result.output
    before = tree_digest(path)
    yield path
    assert tree_digest(path) == before, "a test modified the shared tiny checkpoint"


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Free each module's compiled XLA programs when it ends: hundreds of exported and jitted graphs accumulated
    in one process crashed a later XLA compilation."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()
