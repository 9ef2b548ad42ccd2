"""The byte-level tokenizer and Hugging Face tokenizer.json checkpoints."""

import dataclasses

import pytest

from tandemc.checkpoint import load_checkpoint, save_checkpoint
from tandemc.config import TokenizerConfig, preset
from tandemc.errors import TandemcError
from tandemc.params import init_params
from tandemc.tokenizer import ByteTokenizer


def test_byte_tokenizer_round_trips_utf8():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo' ✓"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and all(0 <= i < 256 for i in ids[1:])
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == text
    assert tok.decode([0xE2, 0x9C]) == "\ufffd"  # a cut-off character decodes, replaced


def word_level_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "hello": 3, "world": 4, "tandem": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(path))
    return path


def hf_config(vocab=6, **tokenizer):
    cfg = preset("tiny")
    fields = dict(type="hf", file="tokenizer.json", bos_token="<s>", eos_token="</s>")
    fields.update(tokenizer)
    return dataclasses.replace(
        cfg, primary=dataclasses.replace(cfg.primary, vocab_size=vocab),
        secondary=dataclasses.replace(cfg.secondary, vocab_size=vocab),
        drafter=dataclasses.replace(cfg.drafter, vocab_size=vocab), tokenizer=TokenizerConfig(**fields))


def test_hf_tokenizer_checkpoint(tmp_path):
    cfg = hf_config()
    path = save_checkpoint(tmp_path / "ckpt", cfg, init_params(cfg, 0),
                           tokenizer_file=word_level_tokenizer(tmp_path / "t.json"))
    tok = load_checkpoint(path).tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, -1)
    assert tok.encode("hello tandem world") == [0, 3, 5, 4]
    assert tok.decode([0, 3, 5, 1]) == "hello tandem"


def test_hf_tokenizer_errors(tmp_path):
    cfg = hf_config(eos_token="<eos>")
    path = save_checkpoint(tmp_path / "a", cfg, init_params(cfg, 0),
                           tokenizer_file=word_level_tokenizer(tmp_path / "t.json"))
    with pytest.raises(TandemcError, match="'tokenizer.eos_token' names '<eos>', which is not in the tokenizer"):
        load_checkpoint(path)
    cfg = hf_config(vocab=4)
    path = save_checkpoint(tmp_path / "b", cfg, init_params(cfg, 0), tokenizer_file=tmp_path / "t.json")
    with pytest.raises(TandemcError, match="the tokenizer has 6 tokens but config field 'primary.vocab_size' is 4"):
        load_checkpoint(path)
    (path / "tokenizer.json").write_text("{}")
    with pytest.raises(TandemcError, match="tokenizer.json is not a valid tokenizer.json"):
        load_checkpoint(path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(TandemcError, match="tokenizer file tokenizer.json named by config field 'tokenizer.file' is missing"):
        load_checkpoint(path)
