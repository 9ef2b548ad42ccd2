"""Export a ~1B-parameter random checkpoint to the TPU target and report wall time and peak memory.

    .venv/bin/python benchmarks/export_1b.py [--workdir DIR] [--dtype bfloat16]

Runs `tandemc init --preset 1b` and `tandemc export --target tpu` (with its verification) as child processes and
prints each one's wall time and peak resident memory (getrusage of the children), plus the artifact's size.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


MEASURE = """
import resource, subprocess, sys, time
start = time.perf_counter()
subprocess.run(sys.argv[1:], check=True)
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def run(args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of one command, measured in its own parent so figures do not mix."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *args], check=True, stdout=subprocess.PIPE, text=True)
    seconds, peak_kib = out.stdout.strip().splitlines()[-1].split()
    return float(seconds), int(peak_kib) / 2 ** 20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tandemc-1b-"))
    tandemc = [sys.executable, "-m", "tandemc.cli"]
    ckpt, out = work / "ckpt-1b", work / "artifact-1b"
    init_s, init_gib = run(tandemc + ["init", str(ckpt), "--preset", "1b", "--force"])
    export_s, export_gib = run(tandemc + ["export", str(ckpt), "--target", "tpu", "-o", str(out), "--force",
                                          "--dtype", args.dtype, "--max-seq-len", "512", "--prefill-chunk", "128",
                                          "--max-new-tokens", "32", "--verify-prompts", "1"])
    manifest = json.loads((out / "manifest.json").read_text())
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(json.dumps({"init_seconds": round(init_s, 1), "init_peak_rss_gib": round(init_gib, 2),
                      "export_seconds": round(export_s, 1), "export_peak_rss_gib": round(export_gib, 2),
                      "artifact_gib": round(size / 2 ** 30, 2), "dtype": args.dtype,
                      "verified": manifest["verification"]["ok"]}, indent=1))


if __name__ == "__main__":
    main()
