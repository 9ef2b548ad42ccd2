"""Training data: text files tokenized into one stream, split into train and held-out by file-name hash.

Batches are a pure function of (seed, step), so a resumed run sees exactly the batches it would have seen.
`stdlib` names the Python standard library's own source, a real corpus of tens of MB on every machine.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tandemc.errors import TandemcError

HELD_OUT_PERCENT = 5


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(source: str | Path, suffixes: tuple[str, ...] = (".py", ".txt", ".md", ".rst")) -> tuple[Path, list[Path]]:
    """(root, files sorted by relative path). `source` is 'stdlib', a directory or a single text file."""
    if str(source) == "stdlib":
        root = stdlib_root()
        files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts]
    else:
        root = Path(source)
        if root.is_file():
            return root.parent, [root]
        if not root.is_dir():
            raise TandemcError(f"training data {source} does not exist; give a text file, a directory or 'stdlib'")
        files = [p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes]
    files = sorted(files, key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise TandemcError(f"no text files ({', '.join(suffixes)}) under {source}")
    return root, files


def is_held_out(relative: str) -> bool:
    """Deterministic split by file name: the same file is held out on every machine."""
    return int(hashlib.sha256(relative.encode()).hexdigest()[:8], 16) % 100 < HELD_OUT_PERCENT


@dataclass
class Corpus:
    train: np.ndarray  # uint16 token stream, each file preceded by BOS
    held_out: np.ndarray
    n_files: tuple[int, int]


def load_corpus(source: str | Path, tokenizer) -> Corpus:
    root, files = list_files(source)
    streams: dict[bool, list[np.ndarray]] = {False: [], True: []}
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        ids = np.asarray(tokenizer.encode(text, add_bos=True), np.uint16)
        streams[is_held_out(path.relative_to(root).as_posix()) and len(files) > 1].append(ids)
    if not streams[False]:
        raise TandemcError(f"every file under {source} fell into the held-out split; add more files")
    join = lambda parts: np.concatenate(parts) if parts else np.zeros((0,), np.uint16)  # noqa: E731
    return Corpus(join(streams[False]), join(streams[True]), (len(streams[False]), len(streams[True])))


def batch_at(stream: np.ndarray, seed: int, step: int, batch: int, length: int) -> np.ndarray:
    """Windows of length+1 tokens (inputs and next-token targets) at offsets drawn from (seed, step)."""
    if len(stream) <= length + 1:
        raise TandemcError(f"the data has {len(stream)} tokens, fewer than one sequence of {length + 1}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(stream) - length - 1, batch)
    return np.stack([stream[s:s + length + 1] for s in starts]).astype(np.int32)


def tiled_batch_at(stream: np.ndarray, seed: int, index: int, batch: int, length: int) -> np.ndarray:
    """Batch `index` (1-based) of the stream's non-overlapping windows of length+1 tokens (the last token of one is
    the first of the next) in an order drawn from the seed: consecutive batches see distinct text until every
    window has been seen once, where random windows (`batch_at`) would leave a third of it unseen."""
    tiles = (len(stream) - 1) // length
    if tiles < 1:
        raise TandemcError(f"the data has {len(stream)} tokens, fewer than one sequence of {length + 1}")
    order = np.random.default_rng([seed, 2**32 - 1]).permutation(tiles)
    picks = order[((index - 1) * batch + np.arange(batch)) % tiles]
    return np.stack([stream[t * length:t * length + length + 1] for t in picks]).astype(np.int32)


def evaluation_windows(stream: np.ndarray, length: int, count: int) -> np.ndarray:
    """`count` evenly spaced, non-overlapping where possible, windows of length+1 for evaluation."""
    if len(stream) <= length + 1:
        raise TandemcError(f"the held-out data has {len(stream)} tokens, fewer than one window of {length + 1}")
    starts = np.linspace(0, len(stream) - length - 1, count).astype(np.int64)
    return np.stack([stream[s:s + length + 1] for s in starts]).astype(np.int32)


def most_frequent_tokens(stream: np.ndarray, count: int) -> np.ndarray:
    """The `count` most frequent token ids of a stream (ties to the lower id), ascending: a draft vocabulary
    (config.draft_vocab), as FR-Spec and EAGLE-3 choose theirs."""
    counts = np.bincount(stream.astype(np.int64))
    order = np.argsort(-counts, kind="stable")[:count]
    if len(order) < count or counts[order[-1]] == 0:
        raise TandemcError(f"the data has {int(np.count_nonzero(counts))} distinct tokens, fewer than the "
                           f"{count} a draft vocabulary of that size needs; give more data or a smaller size")
    return np.sort(order)

