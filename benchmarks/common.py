"""What the benchmark scripts share: the checkpoint argument, the timing prompt, alternating best-of timing."""

from __future__ import annotations

import time
from pathlib import Path

from tandemc.checkpoint import Checkpoint, load_checkpoint
from tandemc.config import preset
from tandemc.params import init_params
from tandemc.tokenizer import ByteTokenizer

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    \"\"\"Parse the command line and"


def add_checkpoint_arguments(parser) -> None:
    parser.add_argument("checkpoint", nargs="?", type=Path)
    parser.add_argument("--preset", help="a random checkpoint of this preset instead (e.g. 100m)")


def benchmark_checkpoint(args) -> Checkpoint:
    if args.preset:
        cfg = preset(args.preset).validate()
        return Checkpoint(cfg, init_params(cfg, 0), ByteTokenizer())
    if args.checkpoint is None:
        raise SystemExit("give a checkpoint directory or --preset NAME")
    return load_checkpoint(args.checkpoint)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_times(fns, repeats: int) -> list[tuple[float, object]]:
    """Best time and last result of each function, the functions alternating call by call (the machine is shared
    and its load drifts: alternating keeps a drift from favouring one side), after a warm-up (compilation,
    sessions)."""
    outs = [fn() for fn in fns]
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return list(zip(best, outs))
