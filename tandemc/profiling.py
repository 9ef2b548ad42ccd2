"""Where an ONNX artifact's time goes: ONNX Runtime's profiler traces, summarized per graph by scope and operator.

ONNX node names carry the jax.named_scope of the code they came from (targets/onnx.py), so a `step` graph's
kernel time splits into `draft0`..`draft{γ-1}` (the drafter), `verify` (the primary over the block), `tandem_kv`
(the primary's keys/values written into the secondary's cache) and the rest (acceptance, sampling, state
bookkeeping). Open an artifact with `tandemc.runtime.load(path, profile=DIR)`, decode, then call
`artifact.backend.end_profiling()` and pass its files to `summarize`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

OTHER = "(other)"


def summarize(trace: Path) -> dict | None:
    """One graph's trace: runs, wall and kernel milliseconds per run, and kernel milliseconds per run by scope and by
    operator (largest first). None when the graph never ran."""
    events = json.loads(Path(trace).read_text())
    runs = [e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    if not runs:
        return None
    by_scope, by_op = defaultdict(float), defaultdict(float)
    kernels = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    for event in kernels:
        name = event["name"][:-len("_kernel_time")]
        by_scope[name.split("/")[0] if "/" in name else OTHER] += event["dur"]
        by_op[event.get("args", {}).get("op_name", "?")] += event["dur"]
    per_run = 1e-3 / len(runs)  # µs summed over runs → ms per run

    def ranked(table):
        return {k: round(v * per_run, 4) for k, v in sorted(table.items(), key=lambda kv: -kv[1])}

    return {"runs": len(runs), "ms_per_run": round(sum(runs) * per_run, 4),
            "kernel_ms_per_run": round(sum(e["dur"] for e in kernels) * per_run, 4),
            "kernels_per_run": round(len(kernels) / len(runs), 1), "by_scope": ranked(by_scope),
            "by_op": ranked(by_op)}


def format_summary(graph: str, summary: dict, top: int = 8) -> str:
    """A few lines for a person: the graph's cost per run, then its scopes and its costliest operators."""
    kernel = summary["kernel_ms_per_run"] or 1.0

    def shares(table):
        return ", ".join(f"{k} {v:.3f} ({100 * v / kernel:.0f}%)" for k, v in list(table.items())[:top])

    return (f"{graph}: {summary['runs']} runs, {summary['ms_per_run']:.3f} ms/run "
            f"(kernels {summary['kernel_ms_per_run']:.3f} ms, {summary['kernels_per_run']:.0f} kernels)\n"
            f"  by scope: {shares(summary['by_scope'])}\n  by operator: {shares(summary['by_op'])}")
