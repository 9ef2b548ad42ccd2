"""`tandemc generate-data`: a corpus of the primary's own greedy outputs, and the tiled batches that train on it."""

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from tandemc.checkpoint import Checkpoint, save_checkpoint
from tandemc.cli import cli
from tandemc.config import preset
from tandemc.data import is_held_out, load_corpus, stdlib_root, tiled_batch_at
from tandemc.decoding import generate
from tandemc.errors import TandemcError
from tandemc.params import init_params
from tandemc.primary_corpus import SUBJECTS, chat_questions, code_prompts, generate_corpus, python_functions
from tandemc.tokenizer import ByteTokenizer, render_chat

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
# benchmarks/smollm2_tandem.py's held-out chat prompts: no stage may train on them.
BENCHMARK_QUESTIONS = ["What is the capital of France, and what is it known for?",
                       "Explain in a few sentences how a hash table works.",
                       "Write a Python function that checks whether a string is a palindrome.",
                       "Give me three tips for writing clear documentation."]


@pytest.fixture(scope="module")
def chat_checkpoint():
    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, chat_template=TEMPLATE))
    return Checkpoint(cfg, init_params(cfg, 2), ByteTokenizer())


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("code")
    for name in ("bisect.py", "heapq.py", "textwrap.py"):
        (root / name).write_bytes((stdlib_root() / name).read_bytes())
    return root


def test_every_sample_is_its_prompt_and_the_primary_greedy_continuation(chat_checkpoint, code_dir, tmp_path):
    """Each file holds a prompt (a code window, or a rendered chat question) followed by exactly the tokens the
    primary's greedy decoding adds to it (tandemc.decoding.generate, primary mode, stopping at EOS)."""
    ckpt, tok = chat_checkpoint, chat_checkpoint.tokenizer
    summary = generate_corpus(ckpt, tmp_path / "data", code=3, chat=2, code_data=code_dir, prompt_tokens=20,
                              new_tokens=12, batch=2, seed=4, progress=None)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "chat-00000.txt", "chat-00001.txt", "code-00000.txt", "code-00001.txt", "code-00002.txt", "made-by.json"]
    assert json.loads((tmp_path / "data" / "made-by.json").read_text()) == summary
    stream = load_corpus(code_dir, tok).train
    questions = chat_questions(2, 4, python_functions(code_dir))
    prompts = code_prompts(stream, 3, 20, 4) + [tok.encode(render_chat(TEMPLATE, q, tok)) for q in questions]
    new = generate(ckpt.params, ckpt.config, prompts, mode="primary", max_new_tokens=12, eos_id=tok.eos_id,
                   max_seq_len=160).tokens
    names = ["code-00000", "code-00001", "code-00002", "chat-00000", "chat-00001"]
    for name, prompt, tokens, question in zip(names, prompts, new, [None] * 3 + questions):
        text = (tmp_path / "data" / f"{name}.txt").read_text()
        head = tok.decode(prompt) if question is None else render_chat(TEMPLATE, question, tok)
        ended = tokens[-1] == tok.eos_id
        assert text == head + tok.decode(tokens[:-1] if ended else tokens) + (tok.token(tok.eos_id) if ended else "")
    assert summary["generated_tokens"] == sum(map(len, new))
    # The corpus reads like any other, split into train and held-out files by name.
    corpus = load_corpus(tmp_path / "data", tok)
    assert sum(corpus.n_files) == 5 and corpus.n_files[1] == sum(is_held_out(f"{n}.txt") for n in names)


def test_chat_questions_are_distinct_seeded_and_never_the_benchmark_ones():
    functions = python_functions("stdlib")
    assert len(functions) > 1000 and all(not f[1].startswith("_") for f in functions)
    questions = chat_questions(3000, 0, functions)
    assert len(set(questions)) == 3000 and questions == chat_questions(3000, 0, functions)
    assert questions != chat_questions(3000, 1, functions)
    assert not set(BENCHMARK_QUESTIONS) & set(questions)
    assert not any(w in s for s in SUBJECTS for w in ("France", "hash table", "palindrome", "documentation"))
    assert any("Python function" in q for q in questions[:10]) and any("Python" not in q for q in questions[:10])
    with pytest.raises(TandemcError, match="only 1164 distinct chat questions"):
        chat_questions(1165, 0, [])


def test_tiled_batches_see_every_window_once_before_any_twice():
    stream = np.arange(1000, dtype=np.uint16)
    windows = [w for i in range(1, 9) for w in tiled_batch_at(stream, 3, i, 4, 32)]
    starts = [int(w[0]) for w in windows]
    assert len(set(starts[:31])) == 31 and starts[31] == starts[0]  # 31 windows of 33 tile 1000 tokens
    assert all(s % 32 == 0 and np.array_equal(w, stream[s:s + 33]) for s, w in zip(starts, windows))
    assert starts != [int(w[0]) for i in range(1, 9) for w in tiled_batch_at(stream, 4, i, 4, 32)]


def test_generate_data_refuses_bad_requests_in_one_line(tiny_checkpoint, chat_checkpoint, tmp_path):
    def run(*args):
        return CliRunner().invoke(cli, ["generate-data", *map(str, args)])

    result = run(tiny_checkpoint, "-o", tmp_path / "d", "--chat", 2, "--code", 0)
    assert result.exit_code == 2 and "has no chat template; use --chat 0" in result.output
    result = run(tiny_checkpoint, "-o", tmp_path / "d", "--chat", 0, "--code", 0)
    assert result.exit_code == 2 and "nothing to generate" in result.output
    (tmp_path / "d").mkdir()
    result = run(tiny_checkpoint, "-o", tmp_path / "d", "--chat", 0, "--code", 1)
    assert result.exit_code == 2 and "already exists; pass --force" in result.output
    result = run(tiny_checkpoint, "-o", tiny_checkpoint / "data", "--chat", 0, "--code", 1)
    assert result.exit_code == 2 and "overlaps the input" in result.output
    assert list((tmp_path / "d").iterdir()) == []
    save_checkpoint(tmp_path / "chat", chat_checkpoint.config, chat_checkpoint.params)
    result = run(tmp_path / "chat", "-o", tmp_path / "e", "--chat", 2, "--code", 0, "--new-tokens", 4, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["chat"] == 2 and len(list((tmp_path / "e").glob("chat-*.txt"))) == 2


def test_tiled_needs_distinct_batches(chat_checkpoint):
    from tandemc.train import TrainOptions
    with pytest.raises(TandemcError, match="--tiled sets how --distinct-batches N are drawn"):
        TrainOptions(stage="tandem", batch=2, seq_len=32, tiled=True).validate(chat_checkpoint)
    assert TrainOptions(stage="tandem", batch=2, seq_len=32, tiled=True, distinct_batches=3).validate(chat_checkpoint)
