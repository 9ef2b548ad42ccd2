"""The training recipe: losses fall, frozen models stay bit-identical, runs resume, the router shortens drafts."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import make
from tandemc import model, safetensors_io
from tandemc.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from tandemc.config import preset
from tandemc.data import batch_at, is_held_out, list_files, load_corpus, stdlib_root
from tandemc.decoding import generate
from tandemc.errors import TandemcError
from tandemc.params import flatten, init_params
from tandemc.tokenizer import ByteTokenizer
from tandemc.train import TrainOptions, initialise_secondary_from_drafter, train, with_primary_state_input

SMALL = dict(batch=8, seq_len=64, lr=3e-3, warmup=5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few real files of the standard library's source, as a directory."""
    root = tmp_path_factory.mktemp("data")
    for name in ("json/decoder.py", "json/encoder.py", "textwrap.py", "bisect.py", "heapq.py", "shlex.py"):
        (root / name.replace("/", "_")).write_bytes((stdlib_root() / name).read_bytes())
    return load_corpus(root, ByteTokenizer())


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("tiny")
    return Checkpoint(cfg, init_params(cfg, 0), ByteTokenizer())


def first_last_loss(result):
    return result.history[0][1], result.history[-1][1]


def test_pretraining_loss_falls(tiny, corpus):
    result = train(tiny, corpus.train, TrainOptions(stage="pretrain", model="primary", steps=40, **SMALL),
                   log_every=10, progress=False)
    first, last = first_last_loss(result)
    assert last < first - 1.0  # from ~5.5 (uniform over 259) well into the byte statistics
    changed = flatten(result.params)
    for name, value in flatten(tiny.params).items():
        assert np.array_equal(changed[name], value) != name.startswith("primary.")


@pytest.mark.parametrize("objective", ["ce", "distil"])
def test_tandem_stage_keeps_the_primary_bit_identical(tiny, corpus, objective):
    start = initialise_secondary_from_drafter(tiny)
    np.testing.assert_array_equal(start.params["secondary"]["embed"], tiny.params["drafter"]["embed"])
    result = train(start, corpus.train, TrainOptions(stage="tandem", objective=objective, steps=25, **SMALL),
                   log_every=5, progress=False)
    first, last = first_last_loss(result)
    assert last < first
    before, after = flatten(start.params), flatten(result.params)
    for name in before:
        frozen = not name.startswith(("secondary.", "tandem."))
        assert np.array_equal(before[name], after[name]) == frozen, name


@pytest.mark.parametrize("logits, feedback", [(False, False), pytest.param(True, False, marks=pytest.mark.slow),
                                              (False, True)])
def test_primary_state_input_starts_silent_and_trains(tiny, corpus, logits, feedback):
    """Initialised from the drafter, the variant's MLP adds exactly nothing (to the input, with
    --primary-state-logits to the logits, with --primary-state-feedback from the drafts before); the tandem stage
    then trains it."""
    variant = with_primary_state_input(tiny, 16, seed=1, logits=logits, feedback=feedback)
    cfg = variant.config
    assert cfg.primary_state_input == 16 and tiny.config.primary_state_input == 0 and cfg.gamma_train > 1
    assert cfg.primary_state_logits == logits and ("w_logits" in variant.params["tandem_input"]) == logits
    assert cfg.primary_state_feedback == feedback and ("w_feedback" in variant.params["tandem_input"]) == feedback
    start, paper = initialise_secondary_from_drafter(variant), initialise_secondary_from_drafter(tiny)
    tokens = batch_at(corpus.train, 1, 0, 4, 64)[:, :-1]
    np.testing.assert_array_equal(model.tandem_forward(start.params, cfg, tokens),
                                  model.tandem_forward(paper.params, tiny.config, tokens))
    result = train(start, corpus.train, TrainOptions(stage="tandem", objective="distil", steps=25, **SMALL),
                   log_every=5, progress=False)
    first, last = first_last_loss(result)
    assert last < first
    before, after = flatten(start.params), flatten(result.params)
    for name in ("w_out",) + ("w_logits",) * logits + ("w_feedback",) * feedback:
        assert not np.array_equal(before[f"tandem_input.{name}"], after[f"tandem_input.{name}"]), name
    for name in before:
        assert np.array_equal(before[name], after[name]) != name.startswith(("secondary.", "tandem")), name


def test_primary_state_input_on_a_checkpoint_that_has_it(tiny):
    """Asking again for the variant a checkpoint already has (the last layer named or left to the default) keeps
    the trained MLP; asking for different settings is refused with one line instead of discarding it."""
    variant = with_primary_state_input(tiny, 16, seed=1)
    last = (tiny.config.primary.n_layers - 1,)
    assert with_primary_state_input(variant, 16, seed=2) is variant
    assert with_primary_state_input(variant, 16, seed=2, layers=last) is variant
    explicit = with_primary_state_input(tiny, 16, layers=last)
    assert with_primary_state_input(explicit, 16) is explicit
    for settings in ({"width": 8}, {"width": 16, "logits": True}, {"width": 16, "feedback": True},
                     {"width": 16, "layers": (0,)}):
        with pytest.raises(TandemcError, match=r"^this checkpoint already has primary_state_input 16 .*pass the "
                                               r"same settings$"):
            with_primary_state_input(variant, **settings)


def test_resumption_continues_from_the_saved_step(tiny, corpus, tmp_path):
    opts = TrainOptions(stage="pretrain", model="drafter", objective="distil", steps=12, save_every=4, **SMALL)
    straight = train(tiny, corpus.train, opts, progress=False)
    state = tmp_path / "state"
    part = train(tiny, corpus.train, opts, state, progress=False, stop_after=7)
    assert part.step == 7 and json.loads((state / "state.json").read_text())["step"] == 7
    resumed = train(tiny, corpus.train, opts, state, progress=False)
    assert resumed.history[0][0] == 8  # continued, did not restart
    for name, value in flatten(straight.params).items():
        np.testing.assert_allclose(flatten(resumed.params)[name], value, rtol=0, atol=1e-6)
    with pytest.raises(TandemcError, match="saved with different options \\(lr\\)"):
        train(tiny, corpus.train, dataclasses.replace(opts, lr=1e-4), state, progress=False)


@pytest.mark.slow
def test_distinct_batches_rotate_and_reuse_the_primary_outputs(tiny, corpus, tmp_path):
    """--distinct-batches N trains on batches 1..N in rotation with the frozen primary's outputs computed once per
    batch: caching changes nothing (a run that fits in N steps is identical to one without it), and a run
    interrupted mid-rotation, whose cache is rebuilt on resume, ends where the uninterrupted one does."""
    start = initialise_secondary_from_drafter(with_primary_state_input(tiny, 16, seed=1))
    opts = TrainOptions(stage="tandem", objective="distil", steps=3, **SMALL)
    fresh = train(start, corpus.train, opts, progress=False)
    cached = train(start, corpus.train, dataclasses.replace(opts, distinct_batches=3), progress=False)
    for name, value in flatten(fresh.params).items():
        np.testing.assert_array_equal(flatten(cached.params)[name], value)

    rotating = dataclasses.replace(opts, steps=8, distinct_batches=3, save_every=4)
    assert [rotating.batch_index(step) for step in range(1, 9)] == [1, 2, 3, 1, 2, 3, 1, 2]
    straight = train(start, corpus.train, rotating, progress=False)
    state = tmp_path / "state"
    assert train(start, corpus.train, rotating, state, progress=False, stop_after=5).step == 5
    resumed = train(start, corpus.train, rotating, state, progress=False)
    for name, value in flatten(straight.params).items():
        np.testing.assert_allclose(flatten(resumed.params)[name], value, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_primary_cache_is_shared_between_runs_and_keyed_by_the_primary(tiny, corpus, tmp_path):
    """--primary-cache keeps the frozen primary's outputs on disk: a run of another stage over the same primary and
    batches reads them instead of recomputing (results unchanged), and a changed primary gets its own entries."""
    start = initialise_secondary_from_drafter(with_primary_state_input(tiny, 16, seed=1))
    cache = tmp_path / "cache"
    tandem = TrainOptions(stage="tandem", objective="distil", steps=3, distinct_batches=3, **SMALL)
    first = train(start, corpus.train, tandem, progress=False, primary_cache=cache)
    [entries] = list(cache.iterdir())
    files = sorted(p.name for p in entries.glob("batch-*"))
    assert files == ["batch-000001.safetensors", "batch-000002.safetensors", "batch-000003.safetensors"]
    stored = safetensors_io.read(entries / files[0])
    # the primary's top tokens (all 259 of the byte vocabulary) and the layers the secondary reads (layer map and last)
    assert sorted(stored) == ["hiddens.1", "top_ids", "top_logits"] and stored["top_ids"].shape[-1] == 259
    assert model.primary_layers_read(start.config) == (1,)
    again = train(start, corpus.train, tandem, progress=False, primary_cache=cache)
    for name, value in flatten(first.params).items():
        np.testing.assert_array_equal(flatten(again.params)[name], value)

    distil = TrainOptions(stage="pretrain", model="drafter", objective="distil", steps=3, **SMALL)
    plain = train(start, corpus.train, distil, progress=False)
    shared = train(start, corpus.train, distil, progress=False, primary_cache=cache)
    for name, value in flatten(plain.params).items():
        np.testing.assert_array_equal(flatten(shared.params)[name], value)
    # It did read the entries: with the stored logits replaced, distillation learns something else.
    for path in entries.glob("batch-*"):
        tensors = safetensors_io.read(path)  # memory-mapped: write a new file and rename it into place
        safetensors_io.write(path.with_suffix(".new"), {**tensors, "top_logits": np.zeros_like(tensors["top_logits"])})
        os.replace(path.with_suffix(".new"), path)
    tampered = train(start, corpus.train, distil, progress=False, primary_cache=cache)
    assert not np.array_equal(flatten(tampered.params)["drafter.embed"], flatten(plain.params)["drafter.embed"])

    changed = jax.tree.map(np.copy, start.params)
    changed["primary"]["embed"][0, 0] += 1.0
    train(dataclasses.replace(start, params=changed), corpus.train, distil, progress=False, primary_cache=cache)
    assert len(list(cache.iterdir())) == 2


@pytest.mark.slow
def test_router_learns_rejection_and_shortens_drafts(corpus):
    """A random secondary's drafts are almost always rejected; a trained router learns that and stops drafting."""
    cfg, params = make(dataclasses.replace(preset("tiny"), router=dataclasses.replace(preset("tiny").router,
                                                                                       threshold=0.5)))
    ckpt = Checkpoint(cfg, jax.tree.map(np.asarray, params), ByteTokenizer())
    result = train(ckpt, corpus.train, TrainOptions(stage="router", steps=60, batch=8, seq_len=64, lr=1e-2,
                                                     warmup=5), log_every=10, progress=False)
    first, last = first_last_loss(result)
    assert last < first
    trained = jax.tree.map(jax.numpy.asarray, result.params)
    prompts = [list(b) for b in batch_at(corpus.train, 0, 0, 4, 16)]
    reference = generate(trained, cfg, prompts, mode="primary", max_new_tokens=16)
    adaptive = generate(trained, cfg, prompts, mode="adaptive", block_length=4, max_new_tokens=16)
    assert adaptive.tokens == reference.tokens  # still exact
    assert adaptive.stats["drafted"] < 0.5 * 4 * adaptive.stats["steps"] * len(prompts)
    # A router that never predicts rejection drafts the full block every step.
    eager = {**trained, "router": {**trained["router"], "b2": jax.numpy.full((1,), -30.0)}}
    full = generate(eager, cfg, prompts, mode="adaptive", block_length=4, max_new_tokens=16)
    assert full.tokens == reference.tokens
    assert full.stats["drafted"] == 4 * sum(len(a) for a in full.accepted)


def test_data_split_is_deterministic_by_file_name():
    root, files = list_files("stdlib")
    held = [f for f in files if is_held_out(f.relative_to(root).as_posix())]
    assert 0.02 < len(held) / len(files) < 0.08
    assert is_held_out("json/decoder.py") == is_held_out("json/decoder.py")
    with pytest.raises(TandemcError, match="does not exist"):
        list_files("/nonexistent/corpus")


def test_batches_are_a_function_of_seed_and_step(corpus):
    a = batch_at(corpus.train, 3, 17, 4, 32)
    assert a.shape == (4, 33) and np.array_equal(a, batch_at(corpus.train, 3, 17, 4, 32))
    assert not np.array_equal(a, batch_at(corpus.train, 3, 18, 4, 32))


DATA_PARALLEL = """
import json, sys
import jax, numpy as np
from tandemc.config import preset
from tandemc.checkpoint import Checkpoint
from tandemc.data import load_corpus
from tandemc.params import init_params
from tandemc.tokenizer import ByteTokenizer
from tandemc.train import TrainOptions, train
cfg = preset("tiny")
corpus = load_corpus(sys.argv[1], ByteTokenizer())
opts = TrainOptions(stage="tandem", objective="distil", steps=4, batch=8, seq_len=32, warmup=1)
r = train(Checkpoint(cfg, init_params(cfg, 0), ByteTokenizer()), corpus.train, opts, log_every=1, progress=False)
print(json.dumps({"devices": jax.local_device_count(), "losses": [h[1] for h in r.history]}))
"""


@pytest.mark.slow
def test_data_parallel_over_8_devices_matches_one(tmp_path):
    data = tmp_path / "data.py"
    data.write_bytes((stdlib_root() / "textwrap.py").read_bytes())
    runs = {}
    for devices in (1, 8):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        proc = subprocess.run([sys.executable, "-c", DATA_PARALLEL, str(data)], env=env, capture_output=True,
                              text=True, check=True)
        runs[devices] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert runs[8]["devices"] == 8 and runs[1]["devices"] == 1
    np.testing.assert_allclose(runs[8]["losses"], runs[1]["losses"], rtol=1e-4)


@pytest.mark.slow
def test_train_cli_writes_a_loadable_checkpoint(tmp_path, corpus):
    from click.testing import CliRunner

    from tandemc.cli import cli

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.py").write_bytes((stdlib_root() / "heapq.py").read_bytes())
    init = save_checkpoint(tmp_path / "init", preset("tiny"), init_params(preset("tiny"), 0))
    result = CliRunner().invoke(cli, ["train", str(init), "-o", str(tmp_path / "out"), "--stage", "tandem",
                                      "--objective", "distil", "--init-secondary-from-drafter", "--data", str(data),
                                      "--steps", "3", "--batch", "4", "--seq-len", "32", "--block-length", "3",
                                      "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["steps"] == 3 and report["trained"] == ["secondary", "tandem"]
    out = load_checkpoint(tmp_path / "out")
    assert out.config.gamma_train == 3
    assert not (tmp_path / "out.train-state").exists()
    bad = CliRunner().invoke(cli, ["train", str(init), "-o", str(tmp_path / "x"), "--stage", "pretrain",
                                   "--model", "primary", "--objective", "distil", "--data", str(data)])
    assert bad.exit_code == 2 and "cannot be distilled from itself" in bad.output
    variant = CliRunner().invoke(cli, ["train", str(init), "-o", str(tmp_path / "variant"), "--stage", "tandem",
                                       "--primary-state-input", "8", "--data", str(data), "--steps", "2",
                                       "--batch", "4", "--seq-len", "32", "--json"])
    assert variant.exit_code == 0, variant.output
    assert json.loads(variant.output[variant.output.index("{"):])["trained"] == ["secondary", "tandem", "tandem_input"]
    cfg = load_checkpoint(tmp_path / "variant").config
    assert cfg.primary_state_input == 8
    info = CliRunner().invoke(cli, ["inspect", str(tmp_path / "variant"), "--json"])
    d_l, d_s = cfg.primary.d_model, cfg.secondary.d_model
    assert json.loads(info.output)["primary_state_input_parameters"] == (d_l + d_s) * 8 + 8 + 8 * d_s
    bad = CliRunner().invoke(cli, ["train", str(init), "-o", str(tmp_path / "x"), "--stage", "pretrain",
                                   "--primary-state-input", "8", "--data", str(data)])
    assert bad.exit_code == 2 and "--primary-state-input belongs to the tandem stage" in bad.output
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_fitted_projections_start_the_tandem_close_to_its_standalone_init(tiny, corpus):
    """Least-squares projections reproduce the secondary's own view of earlier tokens; random ones do not."""
    from tandemc import model
    from tandemc.train import fit_projections

    start = initialise_secondary_from_drafter(tiny)
    tokens = batch_at(corpus.train, 1, 0, 8, 64)[:, :-1]
    fitted = fit_projections(start, batch_at(corpus.train, 2, 0, 16, 64)[:, :-1])
    standalone = model.forward(start.params["secondary"], start.config.secondary, tokens)[0]

    def distance(ckpt):
        logits = model.tandem_forward(jax.tree.map(jax.numpy.asarray, ckpt.params), ckpt.config, tokens, 8)
        tv = 0.5 * np.abs(jax.nn.softmax(logits) - jax.nn.softmax(standalone)).sum(-1)
        return float(np.mean(tv))

    assert distance(fitted) < 0.7 * distance(start)  # measured: 0.21 vs 0.38 mean total variation
    np.testing.assert_array_equal(flatten(fitted.params)["primary.embed"], flatten(start.params)["primary.embed"])


@pytest.mark.slow
def test_router_stage_chooses_its_threshold_on_held_out_data(tmp_path):
    from click.testing import CliRunner

    from tandemc.cli import cli

    data = tmp_path / "data"
    data.mkdir()
    for name in ("heapq.py", "bisect.py", "textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "netrc.py"):
        (data / name).write_bytes((stdlib_root() / name).read_bytes())
    init = save_checkpoint(tmp_path / "init", preset("tiny"), init_params(preset("tiny"), 0))
    result = CliRunner().invoke(cli, ["train", str(init), "-o", str(tmp_path / "out"), "--stage", "router",
                                      "--data", str(data), "--steps", "20", "--batch", "4", "--seq-len", "32",
                                      "--lr", "1e-2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert 0.05 <= report["router_threshold"] <= 0.95
    assert load_checkpoint(tmp_path / "out").config.router.threshold == report["router_threshold"]
    # The router's predictions track the held-out rejection probability (total variation) on average.
    assert abs(report["mean_predicted"] - report["mean_total_variation"]) < 0.15


def test_router_stage_adds_a_router_to_a_checkpoint_without_one(tmp_path):
    """An imported primary's tandem has no router: `--router-hidden` adds a fresh one for the router stage to train,
    and `--draft-cost` (a draft's measured cost per primary step) sets the cost the threshold is chosen by."""
    from click.testing import CliRunner

    from tandemc.cli import cli

    data = tmp_path / "data"
    data.mkdir()
    for name in ("heapq.py", "bisect.py", "textwrap.py", "shlex.py", "fnmatch.py"):
        (data / name).write_bytes((stdlib_root() / name).read_bytes())
    cfg = dataclasses.replace(preset("tiny"), router=None)
    init = save_checkpoint(tmp_path / "init", cfg, init_params(cfg, 0))

    def train_router(*flags, source=init, out="out"):
        return CliRunner().invoke(cli, ["train", str(source), "-o", str(tmp_path / out), "--stage", "router",
                                        "--data", str(data), "--steps", "2", "--batch", "2", "--seq-len", "32",
                                        "--json", *flags])

    missing = train_router()
    assert missing.exit_code != 0 and "pass --router-hidden N" in missing.output
    result = train_router("--router-hidden", "8", "--draft-cost", "0.5")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["cost_ratio"] == 0.5 and report["trained"] == ["router"]
    trained = load_checkpoint(tmp_path / "out")
    assert trained.config.router.hidden == 8 and trained.config.router.threshold == report["router_threshold"]
    assert trained.params["router"]["w1"].shape == (trained.config.router.num_features(cfg.secondary.d_model), 8)
    other = train_router("--router-hidden", "16", source=tmp_path / "out", out="again")
    assert other.exit_code != 0 and "already has a router of hidden width 8" in other.output
    wrong_stage = CliRunner().invoke(cli, ["train", str(init), "-o", str(tmp_path / "x"), "--stage", "pretrain",
                                           "--router-hidden", "8", "--steps", "1"])
    assert wrong_stage.exit_code != 0 and "belong to the router stage" in wrong_stage.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "again").exists()
