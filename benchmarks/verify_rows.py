"""What verifying a block costs on this CPU: ONNX Runtime's float32 MatMul over the primary's matrices with M rows
(M = γ + 1 in a Tandem + SPEED verify) against one row (a primary-only step).

    .venv/bin/python benchmarks/verify_rows.py CKPT [--rows 1,2,3,4,5,8] [--threads 2]
    .venv/bin/python benchmarks/verify_rows.py --preset 100m          # a random checkpoint of a preset's shapes

SPEED pays when (1 + accepted drafts) exceeds what a step costs beside a primary step, and most of a step is
the verify's matrix products. Where one row is bandwidth-bound and M rows cost about the same, γ can be large;
where M rows run into the cores' arithmetic (two cores in float32), each extra row costs and the best γ is small.
The graph holds each layer's products as the -O1 artifact runs them (fused q/k/v, the output projection, fused
gate/up, down) and the LM head, with random weights of the checkpoint's shapes (only the shapes matter), every
product reading the same input; it prints ms per pass, the ratio to one row, the weight bytes streamed per second
and the arithmetic rate. The attention over the cache, the norms and the drafts are left out: `tandemc run
--profile` splits a whole step.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from common import add_checkpoint_arguments, benchmark_checkpoint, best_times, machine_line


def primary_matrices(cfg) -> list[tuple[int, int]]:
    """[K, N] of every matrix a one-token primary step multiplies by, -O1 fusions applied."""
    d, hd = cfg.d_model, cfg.head_dim
    layer = [(d, hd * (cfg.n_heads + 2 * cfg.n_kv_heads)), (hd * cfg.n_heads, d), (d, 2 * cfg.d_ff), (cfg.d_ff, d)]
    return layer * cfg.n_layers + [(d, cfg.vocab_size)]


def matmul_session(shapes: list[tuple[int, int]], threads: int) -> ort.InferenceSession:
    rng = np.random.default_rng(0)
    nodes, weights, outputs = [], [], []
    for i, (k, n) in enumerate(shapes):
        weights.append(numpy_helper.from_array(rng.standard_normal((k, n), np.float32) * 0.02, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"x{k}", f"w{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, "rows", k])
              for k in sorted({k for k, _ in shapes})]
    graph = helper.make_graph(nodes, "verify_rows", inputs, outputs, weights)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_checkpoint_arguments(parser)
    parser.add_argument("--rows", default="1,2,3,4,5,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", type=int, default=20, help="Passes per timed round.")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cfg = benchmark_checkpoint(args).config.primary
    shapes = primary_matrices(cfg)
    session = matmul_session(shapes, args.threads)
    rows = [int(r) for r in args.rows.split(",")]

    def passes(m):
        feeds = {i.name: np.ones((1, m, int(i.name[1:])), np.float32) for i in session.get_inputs()}
        return lambda: [session.run(None, feeds) for _ in range(args.passes)]

    seconds = [best / args.passes for best, _ in best_times([passes(m) for m in rows], args.repeats)]
    weight_bytes = 4 * sum(k * n for k, n in shapes)
    print(f"{len(shapes)} float32 matrices, {weight_bytes / 1e6:.1f} MB (the primary's per-token products, -O1); "
          f"{args.threads} threads; best of {args.repeats} alternating rounds of {args.passes} passes; "
          f"{machine_line()}")
    print("| rows | ms per pass | × one row | weights GB/s | GFLOP/s |")
    print("|---|---|---|---|---|")
    one = seconds[rows.index(1)] if 1 in rows else seconds[0]
    for m, s in zip(rows, seconds):
        print(f"| {m} | {s * 1e3:.2f} | {s / one:.2f} | {weight_bytes / s / 1e9:.1f} | "
              f"{2 * m * weight_bytes / 4 / s / 1e9:.0f} |")


if __name__ == "__main__":
    main()
