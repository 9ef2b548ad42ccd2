"""A training corpus of the primary's own greedy outputs (`tandemc generate-data`).

At decoding time a draft is checked against the primary's own choice, so a drafter should learn to predict what
the primary says, not what a person wrote. Training on the primary's continuations of prompts like the ones it
will serve (as Medusa-2 and EAGLE's self-distillation do) puts the drafters on the text they will draft: code
(windows of a corpus's training split, continued) and chat (questions through the model's chat template,
answered). Each sample is one text file, so the corpus is read like any other (`tandemc train --data DIR`),
split into train and held-out by file name, and can be read by a person.

The outputs come from a float32 primary-mode CPU artifact of the checkpoint (ONNX Runtime, batched): the same
greedy tokens as `tandemc run --mode primary`, 3x faster here than the JAX reference at batch 32.
"""

from __future__ import annotations

import ast
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tandemc.atomic import atomic_directory
from tandemc.checkpoint import Checkpoint
from tandemc.data import is_held_out, list_files, load_corpus
from tandemc.errors import TandemcError

# General subjects for chat questions. The benchmark's held-out chat questions (benchmarks/smollm2_tandem.py) are
# about France, hash tables, palindromes and documentation: none of those is here.
SUBJECTS = (
    "photosynthesis", "the water cycle", "black holes", "the French Revolution", "the Roman Empire", "vaccines",
    "inflation", "machine learning", "climate change", "recursion", "the immune system", "plate tectonics",
    "the printing press", "supply and demand", "quantum computing", "the Industrial Revolution", "DNA",
    "the solar system", "electric cars", "compound interest", "the theory of evolution", "the Great Wall of China",
    "the Internet", "renewable energy", "the human heart", "volcanoes", "the Renaissance", "sleep", "coffee",
    "the Moon landing", "antibiotics", "binary numbers", "the stock market", "honeybees", "rainbows",
    "the Olympic Games", "the Amazon rainforest", "public key cryptography", "the greenhouse effect", "gravity",
    "meditation", "the Pythagorean theorem", "the periodic table", "earthquakes", "ancient Egypt", "democracy",
    "a balanced diet", "the speed of light", "operating systems", "version control with Git", "unit testing",
    "regular expressions", "sorting algorithms", "linked lists", "relational databases", "the HTTP protocol",
    "object-oriented programming", "functional programming", "compilers", "virtual memory", "cloud computing",
    "neural networks", "the Fibonacci sequence", "prime numbers", "probability", "statistics", "calculus",
    "Shakespeare", "the piano", "jazz", "photography", "gardening", "bread baking", "marathon training",
    "learning a new language", "time management", "public speaking", "job interviews", "saving money",
    "the Pacific Ocean", "Mount Everest", "Japan", "Brazil", "Canada", "Egypt", "India", "Italy", "Kenya",
    "Australia", "Mexico", "the Arctic", "deserts", "coral reefs", "dinosaurs", "whales", "owls", "wolves",
)
GENERAL = ("What is {}?", "Explain {} in a few sentences.", "Give me three facts about {}.", "How does {} work?",
           "Why does {} matter?", "Write a short paragraph about {}.", "Describe {} to a ten-year-old.",
           "What are common misconceptions about {}?", "Tell me something surprising about {}.",
           "Summarize what a beginner should know about {}.", "Write a short poem about {}.",
           "What questions should I ask to learn more about {}?")
FUNCTIONS = ("What does the Python function {0}.{1} do?", "Show me how to use {0}.{1} with a short example.",
             "Write a Python function that does this: {2}", "How would I implement {1} myself in Python? {2}",
             "Explain the Python module {0} and when to use it.")


def python_functions(source: str | Path = "stdlib") -> list[tuple[str, str, str]]:
    """(module, function, first docstring line) for the documented public top-level functions of the training
    split's Python files: topics for programming questions."""
    root, files = list_files(source)
    found = []
    for path in files:
        relative = path.relative_to(root)
        if path.suffix != ".py" or is_held_out(relative.as_posix()) or "test" in relative.as_posix():
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                doc = (ast.get_docstring(node) or "").strip().split("\n")[0].strip()
                if 20 <= len(doc) <= 120 and doc.isascii():
                    found.append((module, node.name, doc))
    return found


def chat_questions(count: int, seed: int, functions: list[tuple[str, str, str]]) -> list[str]:
    """`count` distinct questions, half about general subjects and half about the given Python functions, drawn
    from (seed)."""
    rng = np.random.default_rng([seed, 1])
    general = [t.format(s) for t in GENERAL for s in SUBJECTS]
    programming = [t.format(*f) for t in FUNCTIONS for f in functions]
    pools = [general, programming] if programming else [general]
    order = [rng.permutation(len(pool)) for pool in pools]
    picked, seen = [], set()
    for i in range(max(len(p) for p in pools)):
        for pool, perm in zip(pools, order):
            if i < len(pool) and pool[perm[i]] not in seen and len(picked) < count:
                seen.add(pool[perm[i]])
                picked.append(pool[perm[i]])
    if len(picked) < count:
        raise TandemcError(f"only {len(picked)} distinct chat questions can be made here; ask for --chat "
                           f"{len(picked)} or fewer")
    return picked


def code_prompts(stream: np.ndarray, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` windows of `length` tokens at offsets drawn from (seed) in a training-split token stream."""
    if len(stream) <= length:
        raise TandemcError(f"the code data has {len(stream)} training tokens, fewer than one prompt of {length}")
    starts = np.random.default_rng([seed, 0]).integers(0, len(stream) - length, count)
    return [stream[s:s + length].astype(np.int64).tolist() for s in starts]


def generate_corpus(ckpt: Checkpoint, out: str | Path, *, code: int, chat: int, code_data: str | Path = "stdlib",
                    prompt_tokens: int = 96, new_tokens: int = 128, batch: int = 32, seed: int = 0,
                    force: bool = False, progress=sys.stderr) -> dict:
    """Write `code` + `chat` samples of the primary's greedy outputs to the directory `out` (code-NNNNN.txt,
    chat-NNNNN.txt and made-by.json); returns the summary written to made-by.json."""
    from tandemc.export import export
    from tandemc.program import ExportOptions
    from tandemc.runtime import load
    from tandemc.tokenizer import render_chat

    if code + chat == 0:
        raise TandemcError("nothing to generate: give --code or --chat a count above 0")
    if new_tokens < 1 or prompt_tokens < 1 or batch < 1:
        raise TandemcError("--new-tokens, --prompt-tokens and --batch must be >= 1")
    tok, template = ckpt.tokenizer, ckpt.config.tokenizer.chat_template
    if chat and not template:
        raise TandemcError("this checkpoint's tokenizer has no chat template; use --chat 0")
    samples = []  # (file stem, prompt ids, prompt text or None)
    if code:
        stream = load_corpus(code_data, tok).train
        samples += [(f"code-{i:05d}", p, None) for i, p in enumerate(code_prompts(stream, code, prompt_tokens, seed))]
    if chat:
        questions = chat_questions(chat, seed, python_functions(code_data))
        rendered = [render_chat(template, q, tok) for q in questions]
        samples += [(f"chat-{i:05d}", tok.encode(text), text) for i, text in enumerate(rendered)]
    longest = max(len(ids) for _, ids, _ in samples)
    began = time.perf_counter()
    with atomic_directory(out, force=force, sources=(ckpt.path,) if ckpt.path else ()) as tmp, \
            tempfile.TemporaryDirectory() as scratch:
        options = ExportOptions(mode="primary", max_seq_len=(longest + new_tokens,), batch=batch,
                                prefill_chunk=min(128, longest), max_new_tokens=1)
        export(ckpt, "cpu", Path(scratch) / "primary", options, verify=False, passes="O1")
        artifact = load(Path(scratch) / "primary")
        generated = 0
        for first in range(0, len(samples), batch):
            part = samples[first:first + batch]
            result = artifact.run_steps([ids for _, ids, _ in part], new_tokens, eos_id=tok.eos_id)
            for (stem, ids, text), new in zip(part, result.tokens):
                ended = bool(new) and new[-1] == tok.eos_id
                body = tok.decode(new[:-1] if ended else new) + (tok.token(tok.eos_id) if ended else "")
                (tmp / f"{stem}.txt").write_text((tok.decode(ids) if text is None else text) + body)
                generated += len(new)
            if progress:
                done = min(first + batch, len(samples))
                print(f"generate-data: {done}/{len(samples)} samples, {generated} tokens, "
                      f"{generated / (time.perf_counter() - began):.0f} tokens/s", file=progress, flush=True)
        summary = {"code": code, "chat": chat, "code_data": str(code_data), "prompt_tokens": prompt_tokens,
                   "new_tokens": new_tokens, "seed": seed, "generated_tokens": generated,
                   "seconds": round(time.perf_counter() - began, 1)}
        (tmp / "made-by.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
