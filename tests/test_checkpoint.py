"""The checkpoint format: round trips, interoperability, and a specific one-line error for every bad case."""

import json
import struct

import numpy as np
import pytest

from tandemc import safetensors_io
from tandemc.checkpoint import inspect_checkpoint, load_checkpoint, save_checkpoint
from tandemc.config import TandemConfig, preset
from tandemc.errors import TandemcError
from tandemc.params import flatten, init_params


@pytest.fixture
def ckpt(tmp_path):
    cfg = preset("tiny")
    path = save_checkpoint(tmp_path / "ckpt", cfg, init_params(cfg, 0))
    return path


def test_round_trip_is_exact_and_deterministic(tmp_path):
    cfg = preset("tiny")
    params = init_params(cfg, 3)
    a = save_checkpoint(tmp_path / "a", cfg, params)
    b = save_checkpoint(tmp_path / "b", cfg, params)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "config.json").read_text() == (b / "config.json").read_text()
    loaded = load_checkpoint(a)
    assert loaded.config == cfg
    for name, value in flatten(params).items():
        np.testing.assert_array_equal(flatten(loaded.params)[name], value)


def test_files_interoperate_with_the_reference_safetensors_library(ckpt, tmp_path):
    from safetensors.numpy import load_file, save_file

    ours = safetensors_io.read(ckpt / "model.safetensors")
    theirs = load_file(str(ckpt / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name])
    save_file({k: np.asarray(v) for k, v in theirs.items()}, str(tmp_path / "theirs.safetensors"))
    for name, value in safetensors_io.read(tmp_path / "theirs.safetensors").items():
        np.testing.assert_array_equal(value, ours[name])


def test_bfloat16_round_trip(tmp_path):
    import dataclasses

    cfg = dataclasses.replace(preset("tiny"), dtype="bfloat16")
    path = save_checkpoint(tmp_path / "bf16", cfg, init_params(cfg, 0))
    loaded = load_checkpoint(path)
    assert loaded.params["primary"]["embed"].dtype.name == "bfloat16"
    assert (path / "model.safetensors").stat().st_size < 700_000 / 2 + 10_000


def test_refuses_to_overwrite_without_force(ckpt):
    cfg = preset("tiny")
    before = (ckpt / "model.safetensors").read_bytes()
    with pytest.raises(TandemcError, match="already exists; pass --force"):
        save_checkpoint(ckpt, cfg, init_params(cfg, 1))
    assert (ckpt / "model.safetensors").read_bytes() == before
    save_checkpoint(ckpt, cfg, init_params(cfg, 1), force=True)
    assert (ckpt / "model.safetensors").read_bytes() != before
    assert [p.name for p in ckpt.parent.iterdir()] == ["ckpt"]  # no temporary directories left behind


def test_invalid_parameters_are_never_written(tmp_path):
    cfg = preset("tiny")
    params = init_params(cfg, 0)
    params["primary"]["layers"][0]["wq"][0, 0] = np.nan
    with pytest.raises(TandemcError, match="primary.layers.0.wq' contains NaN"):
        save_checkpoint(tmp_path / "bad", cfg, params)
    assert not (tmp_path / "bad").exists()


# --- every bad checkpoint gives its own error -------------------------------------------------------------------

def rewrite_tensors(path, edit):
    tensors = {k: np.array(v) for k, v in safetensors_io.read(path / "model.safetensors").items()}
    edit(tensors)
    safetensors_io.write(path / "model.safetensors", tensors)


def rewrite_config(path, edit):
    data = json.loads((path / "config.json").read_text())
    edit(data)
    (path / "config.json").write_text(json.dumps(data))


def expect(path, message):
    with pytest.raises(TandemcError, match=message) as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_missing_tensor(ckpt):
    rewrite_tensors(ckpt, lambda t: t.pop("secondary.layers.0.wv"))
    expect(ckpt, r"missing tensor 'secondary.layers.0.wv'")


def test_extra_tensor(ckpt):
    rewrite_tensors(ckpt, lambda t: t.update({"primary.layers.0.bias": np.zeros(3, np.float32)}))
    expect(ckpt, r"unexpected tensor 'primary.layers.0.bias'")


def test_misshaped_tensor(ckpt):
    rewrite_tensors(ckpt, lambda t: t.update({"tandem.0.weight": np.zeros((64, 31), np.float32)}))
    expect(ckpt, r"tensor 'tandem.0.weight' has shape \(64, 31\) but the config implies \(64, 32\) = "
                 r"\(primary.d_model, secondary.d_model\)")


def test_wrong_dtype(ckpt):
    rewrite_tensors(ckpt, lambda t: t.update({"router.b1": t["router.b1"].astype(np.float16)}))
    expect(ckpt, r"tensor 'router.b1' has dtype float16 but config field 'dtype' is float32")


def test_truncated_file(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[:-1000])
    expect(ckpt, r"model.safetensors is truncated: tensor '.*' ends at byte")
    (ckpt / "model.safetensors").write_bytes(data[:5])
    expect(ckpt, r"model.safetensors is truncated: 5 bytes")
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", 10 ** 6) + b"{}")
    expect(ckpt, r"truncated or not safetensors: header claims 1000000 bytes")


def test_corrupt_header(ckpt):
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", 4) + b"{]]]")
    expect(ckpt, r"corrupt safetensors header")


def test_config_contradicting_tensors(ckpt):
    rewrite_config(ckpt, lambda c: c["primary"].update(d_model=128))
    expect(ckpt, r"tensor 'primary.embed' has shape \(259, 64\) but the config implies \(259, 128\)")


def test_config_naming_more_layers_than_stored(ckpt):
    rewrite_config(ckpt, lambda c: c["secondary"].update(n_layers=2))
    expect(ckpt, r"config field 'layer_map' has 1 entries; it needs one per secondary layer \(2\)")


@pytest.mark.parametrize("value, kind", [(np.nan, "NaN"), (np.inf, "Inf")])
def test_non_finite_weights(ckpt, value, kind):
    def poison(t):
        t["drafter.final_norm"][3] = value
    rewrite_tensors(ckpt, poison)
    expect(ckpt, rf"tensor 'drafter.final_norm' contains {kind}")


def test_mismatched_vocab(ckpt):
    rewrite_config(ckpt, lambda c: c["secondary"].update(vocab_size=300))
    expect(ckpt, r"'secondary.vocab_size' \(300\) differs from 'primary.vocab_size' \(259\)")


def test_unknown_schema_version(ckpt):
    rewrite_config(ckpt, lambda c: c.update(schema_version=7))
    expect(ckpt, r"'schema_version' is 7; this tandemc reads version 1")


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("primary"), r"config field 'primary' is missing"),
    (lambda c: c["primary"].update(n_heads="4"), r"config field 'primary.n_heads' must be an integer"),
    (lambda c: c.update(colour="blue"), r"config field 'colour' is not a known field"),
    (lambda c: c["primary"].update(n_kv_heads=3), r"'primary.n_kv_heads' \(3\) must divide 'primary.n_heads' \(4\)"),
    (lambda c: c.update(layer_map=[5]), r"'layer_map\[0\]' is 5; it must name a primary layer in 0..1"),
    (lambda c: c.update(gamma_train=0), r"'gamma_train' must be >= 1"),
    (lambda c: c.update(primary_state_logits=True), r"'primary_state_logits' needs 'primary_state_input' > 0"),
    (lambda c: c.update(primary_state_layers=[1]), r"'primary_state_layers' needs 'primary_state_input' > 0"),
    (lambda c: c.update(primary_state_feedback=True), r"'primary_state_feedback' needs 'primary_state_input' > 0"),
    (lambda c: c.update(primary_state_input=4, primary_state_layers=[2]),
     r"'primary_state_layers\[0\]' is 2; it must name a primary layer in 0..1"),
    (lambda c: c.update(primary_state_input=4, primary_state_layers=[1, 1]),
     r"'primary_state_layers' names a layer twice \(\[1, 1\]\)"),
    (lambda c: c.update(dtype="int8"), r"'dtype' must be one of"),
    (lambda c: c["tokenizer"].update(type="sentencepiece"), r"'tokenizer.type' must be 'byte' or 'hf'"),
    (lambda c: c["primary"].update(tie_embeddings=1), r"'primary.tie_embeddings' must be true or false"),
    (lambda c: c.update(draft_vocab=8), r"'secondary.vocab_size' \(259\) must be draft_vocab \+ 1 \(9\)"),
    (lambda c: c.update(draft_vocab=-1), r"'draft_vocab' must be in 0..258"),
])
def test_bad_config_fields(ckpt, edit, message):
    rewrite_config(ckpt, edit)
    expect(ckpt, message)


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    expect(ckpt, r"config.json is not valid JSON \(line 1, column 2\)")


def test_missing_files(ckpt, tmp_path):
    expect(tmp_path / "nowhere", r"checkpoint directory .*nowhere does not exist")
    (ckpt / "model.safetensors").unlink()
    expect(ckpt, r"has no model.safetensors")
    (ckpt / "config.json").unlink()
    expect(ckpt, r"has no config.json")


def test_pickles_are_never_loaded(ckpt):
    """A pickle where the weights belong is rejected as not-safetensors, never unpickled."""
    import pickle

    (ckpt / "model.safetensors").write_bytes(pickle.dumps({"primary.embed": np.zeros(3)}))
    with pytest.raises(TandemcError, match="model.safetensors"):
        load_checkpoint(ckpt)


def test_inspect_reads_header_only(ckpt):
    cfg, header = inspect_checkpoint(ckpt)
    assert cfg == preset("tiny")
    assert header["primary.embed"]["shape"] == [259, 64]


def test_config_json_round_trip():
    cfg = preset("small")
    assert TandemConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_presets_span_tiny_to_a_billion_parameters():
    from tandemc.config import PRESETS
    from tandemc.params import count

    assert count(init_params(preset("tiny"), 0)["primary"]) == preset("tiny").primary.num_parameters()
    sizes = {name: cfg.primary.num_parameters() for name, cfg in PRESETS.items()}
    assert sizes["tiny"] < 200_000 and 4e6 < sizes["small"] < 6e6
    assert 0.9e8 < sizes["100m"] < 1.2e8 and 0.9e9 < sizes["1b"] < 1.2e9
    for name, cfg in PRESETS.items():
        cfg.validate()
        if name != "tiny":  # a primary several times the secondary's cost
            assert cfg.secondary.num_parameters() * 5 < cfg.primary.num_parameters()


def test_draft_vocabulary_round_trips_and_is_checked(tmp_path):
    """A draft vocabulary is two int32 tensors whatever the float dtype; tokens and index that disagree are
    refused by name."""
    import dataclasses

    from tandemc.params import draft_vocab

    base = preset("tiny")
    small = dataclasses.replace(base.secondary, vocab_size=33)
    cfg = dataclasses.replace(base, secondary=small, drafter=small, draft_vocab=32, dtype="bfloat16").validate()
    params = init_params(cfg, 0)
    params["draft_vocab"] = draft_vocab([200, 3, 99] + list(range(100, 129)), 259)
    path = save_checkpoint(tmp_path / "ckpt", cfg, params)
    loaded = load_checkpoint(path)
    assert loaded.params["draft_vocab"]["tokens"].dtype == np.int32
    assert list(loaded.params["draft_vocab"]["tokens"][:3]) == [3, 99, 100]
    assert loaded.params["draft_vocab"]["index"][200] == 31 and loaded.params["draft_vocab"]["index"][0] == 32
    params["draft_vocab"]["index"] = np.roll(params["draft_vocab"]["index"], 1)
    with pytest.raises(TandemcError, match="draft_vocab.index must map each of them to its position"):
        save_checkpoint(tmp_path / "bad", cfg, params)
    assert not (tmp_path / "bad").exists()


def test_draft_vocabulary_is_the_most_frequent_tokens():
    from tandemc.data import most_frequent_tokens

    stream = np.array([5, 5, 5, 2, 2, 9, 9, 7], np.uint16)
    assert list(most_frequent_tokens(stream, 3)) == [2, 5, 9]  # 2 and 9 tie: the lower id first, then sorted
    with pytest.raises(TandemcError, match="4 distinct tokens, fewer than the 5"):
        most_frequent_tokens(stream, 5)
