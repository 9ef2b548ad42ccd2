"""What the benchmark scripts share: the checkpoint argument, the timing prompt, alternating best-of timing, the
machine line printed beside every figure."""

from __future__ import annotations

import os
import platform
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


def machine_line() -> str:
    """The CPU, its cores and the load average: the same script gives other ratios on another CPU (how much a
    γ + 1-row verify costs beside a one-row step depends on its memory bandwidth and vector width), and load
    from anything else running skews them."""
    model, vectors = platform.processor() or platform.machine(), ""
    try:
        fields = (line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
        info = {key.strip(): value.strip() for key, value in fields}
        model, flags = info.get("model name", model), info.get("flags", "").split()
        vectors = next((f" ({isa})" for flag, isa in [("avx512f", "AVX-512"), ("avx2", "AVX2")] if flag in flags), "")
    except OSError:
        pass
    load1, load5, _ = os.getloadavg()
    return f"CPU {model}{vectors}, {os.cpu_count()} cores; load average {load1:.2f} (1 min) {load5:.2f} (5 min)"


def best_in_turns(runs: dict, cases: list, repeats: int) -> dict[str, float]:
    """Per run, the sum over `cases` of its best seconds on each, the runs taking turns case by case (`run(case)`
    returns the seconds it took): seconds apart, so that a drift in the host's load, which on a shared machine lasts
    minutes and slows a bandwidth-bound one-row step most, hits every run alike; whole rounds per run do not."""
    best = {name: [float("inf")] * len(cases) for name in runs}
    for _ in range(repeats):
        for i, case in enumerate(cases):
            for name, run in runs.items():
                best[name][i] = min(best[name][i], run(case))
    return {name: sum(times) for name, times in best.items()}


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
