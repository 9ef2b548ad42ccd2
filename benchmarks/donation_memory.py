"""Cache donation in the StableHLO modules: what one `step` call holds in memory, with and without.

    .venv/bin/pip install -e .
    .venv/bin/python benchmarks/donation_memory.py [--batch 8] [--max-seq-len 1024]

Exports the bundled example checkpoint for the tpu target (platform cpu, speed mode) twice: as tandemc writes it
(the state inputs donated: `tf.aliasing_output` on the module's arguments) and with donation switched off in the
exporter, as artifacts were before. For each, XLA's own memory analysis of the compiled step as a runtime calls
it (`jax.jit(exported.call, donate_argnums=state)`, as tandemc.runtime does, and without donate_argnums, as a
runtime that knows nothing of the manifest's state does): argument, output, aliased and temporary bytes, and the
peak they imply (arguments + outputs + temporaries - aliased). Deterministic: no timing, so load does not matter.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
import numpy as np
from jax import export

from tandemc import safetensors_io
from tandemc.artifact import read_manifest
from tandemc.checkpoint import load_checkpoint
from tandemc.export import export as export_artifact
from tandemc.program import ExportOptions
from tandemc.targets import stablehlo

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tandem-stdlib"


def analyse(art: Path, donate: bool) -> dict:
    manifest = read_manifest(art)
    key = next(k for k, e in manifest["graphs"].items() if e["name"] == "step")
    entry = manifest["graphs"][key]
    exported = export.deserialize(bytearray((art / entry["module"]).read_bytes()))
    weights = safetensors_io.read(art / manifest["weights_file"])
    args = [weights[n] for n in entry["weights"]] + [np.zeros(s["shape"], s["dtype"]) for s in entry["inputs"]]
    first_state = len(entry["weights"])
    state = tuple(range(first_state, first_state + len(entry["state"]))) if donate else ()
    stats = jax.jit(exported.call, donate_argnums=state).lower(*args).compile().memory_analysis()
    caches = sum(int(np.prod(s["shape"])) * np.dtype(s["dtype"]).itemsize for s in entry["inputs"]
                 if s["name"] in entry["state"].values())
    return {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
            "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes, "state": caches,
            "peak": stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    args = parser.parse_args()
    ckpt = load_checkpoint(EXAMPLE)
    options = ExportOptions(mode="speed", batch=args.batch, max_seq_len=(args.max_seq_len,), prefill_chunk=64)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        export_artifact(ckpt, "tpu", Path(tmp) / "donated", options, platforms=["cpu"], verify=False)
        original = stablehlo.donated_arguments
        stablehlo.donated_arguments = lambda graph: ()  # the exporter as it was: no aliasing in the modules
        try:
            export_artifact(ckpt, "tpu", Path(tmp) / "plain", options, platforms=["cpu"], verify=False)
        finally:
            stablehlo.donated_arguments = original
        for module in ("donated", "plain"):
            for runtime in (True, False):
                rows[module, runtime] = analyse(Path(tmp) / module, runtime)
    mb = 1 / 2 ** 20
    print(f"example checkpoint, speed mode, batch {args.batch}, cache length {args.max_seq_len}: the step graph")
    print("| module | runtime donates state | arguments MiB | outputs MiB | aliased MiB | temporaries MiB | "
          "peak MiB | state MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for (module, runtime), r in rows.items():
        print(f"| {module} | {'yes' if runtime else 'no'} | {r['arguments'] * mb:.1f} | {r['outputs'] * mb:.1f} | "
              f"{r['aliased'] * mb:.1f} | {r['temporaries'] * mb:.1f} | {r['peak'] * mb:.1f} | {r['state'] * mb:.1f} |")


if __name__ == "__main__":
    main()
