"""Passes: Program → Program rewrites of the parameters, each named, documented and checked (design.md §2).

A pass changes how the weights are laid out or stored, never what the model computes beyond float rounding
(exact passes) or its stated quantization error (lossy passes). The model (tandemc/model.py) reads every layout
a pass produces, so every target lowers the rewritten Program with no pass-specific code except the one native
operator a quantized matmul maps to.

    from tandemc.passes import run_passes
    program = run_passes(program, ["fuse_qkv", "quantize_int8"])        # or preset("O2")

Each applied pass appends a report to `program.passes` (it goes into the artifact's manifest): its options, what
it changed, and the check — the reference logits before and after it on fixed token sequences. An exact pass
whose logits move by more than the float tolerance raises; a lossy one reports its measured effect.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Callable

from tandemc.errors import TandemcError
from tandemc.passes import check, folding, fusion, quantize
from tandemc.program import Program


@dataclass(frozen=True)
class Pass:
    name: str
    summary: str
    exact: bool
    fn: Callable  # (config, params, **options) -> (config, params, details dict)
    options: dict = dataclasses.field(default_factory=dict)


# In the documented order: folds first (they read unfused matrices), then fusions, then quantization (it
# quantizes whatever matrices the earlier passes left).
REGISTRY: dict[str, Pass] = {p.name: p for p in [
    Pass("dedupe_tied", "an untied LM head equal to the embedding table is tied: stored once", True,
         fusion.dedupe_tied),
    Pass("fold_projection", "tandem projection FF_j folded into the secondary's K/V weights: one matmul per layer",
         True, folding.fold_projection),
    Pass("fold_draft_head", "a drafter's head projection folded into its rows of the primary's table: one matmul "
         "per draft", True, folding.fold_draft_head),
    Pass("fold_norm_scale", "RMSNorm gains folded into the matrices that read the normalised values", True,
         folding.fold_norm_scale),
    Pass("fuse_qkv", "Q, K and V projections in one matmul", True, fusion.fuse_qkv),
    Pass("fuse_gate_up", "SwiGLU gate and up projections in one matmul", True, fusion.fuse_gate_up),
    Pass("quantize_int8", "int8 weight-only, symmetric, per output channel (activations=int8: CPU int8 kernels)",
         False, quantize.quantize, {"bits": 8, "block": 0}),
    Pass("quantize_int4", "int4 weight-only, symmetric, blocks of 32 input rows", False, quantize.quantize,
         {"bits": 4, "block": 32}),
]}
# Each a list of pass specs (parse syntax). -O2 is portable to every target; -O3 quantizes activations too, for
# the CPU and TPU targets: ONNX Runtime's int8 kernels are the only fast int8 path on CPUs.
_EXACT = ["dedupe_tied", "fold_projection", "fold_draft_head", "fuse_qkv", "fuse_gate_up"]
PRESETS = {
    "O0": [],
    "O1": _EXACT,
    "O2": _EXACT + ["quantize_int8"],
    "O3": _EXACT + ["quantize_int8:block=128:activations=int8"],
}


def parse(spec: str) -> list[tuple[str, dict]]:
    """Comma-separated `name[:key=value...]` items, e.g. "O1,quantize_int4:block=64:models=primary".

    Options after a colon: `block=N` (quantization block, 0 = per channel), `models=primary+secondary` (which
    models a quantization pass touches), `keep=embed+lm_head` (matrices left in float), `activations=int8`
    (quantize the matmuls' inputs at run time too), `scheme=asymmetric` (a minimum per block as well as a scale).
    """
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, *opts = item.split(":")
        options = {}
        for opt in opts:
            key, _, value = opt.partition("=")
            if not value:
                raise TandemcError(f"pass option {opt!r} in {item!r} must be key=value")
            options[key] = value
        out.append((name, options))
    return out


def resolve(names) -> list[tuple[str, dict]]:
    """Names, (name, options) pairs or presets ("O1"), as a list or one comma-separated string → checked pairs."""
    if isinstance(names, str):
        names = parse(names)
    out = []
    for item in names:
        if isinstance(item, str):
            out += resolve(parse(item)) if ":" in item or "," in item else resolve([(item, {})])
            continue
        name, options = item
        if name in PRESETS and not options:  # a preset inside a list: "O1,quantize_int4"
            out += resolve(PRESETS[name])
            continue
        if name not in REGISTRY:
            raise TandemcError(f"unknown pass {name!r}; `tandemc passes` lists them ({', '.join(REGISTRY)})")
        out.append((name, dict(options)))
    return out


FIXED_OPTIONS = ("bits",)  # set by the pass's name (quantize_int8, quantize_int4), not by the user


def check_options(p: Pass, options: dict) -> dict:
    """A pass's user options, checked against its signature and typed like their defaults (`block=abc`, an option
    the pass does not take, or one its name fixes are refused with the pass named)."""
    parameters = {name: param for name, param in list(inspect.signature(p.fn).parameters.items())[2:]
                  if name not in FIXED_OPTIONS}
    out = {}
    for key, value in options.items():
        if key not in parameters:
            takes = ", ".join(parameters) or "no options"
            raise TandemcError(f"pass {p.name} has no option {key!r} (it takes: {takes})")
        default = p.options.get(key, parameters[key].default)
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise TandemcError(f"pass {p.name} option {key}={value!r} must be an integer") from None
        out[key] = value
    return out


def run_passes(program: Program, names, *, prompts: list[list[int]] | None = None) -> Program:
    """Apply passes in the given order; each is checked against the Program before it (see module docstring)."""
    for name, options in resolve(names):
        program = run_pass(program, name, options, prompts)
    return program


def run_pass(program: Program, name: str, options: dict, prompts=None) -> Program:
    p = REGISTRY[name]
    if p.exact and any(not done["exact"] for done in program.passes):
        raise TandemcError(f"pass {name} must run before quantization (it rewrites float matrices); put "
                           "quantize_* last")
    merged = {**p.options, **check_options(p, options)}
    config, params, details = p.fn(program.config, program.params, **merged)
    after = dataclasses.replace(program, config=config, params=params)
    report = {"name": name, "exact": p.exact, "options": dict(options), **details,
              "check": check.compare(program, after, exact=p.exact, prompts=prompts)}
    if p.exact and not report["check"]["ok"]:
        raise TandemcError(f"pass {name} changed the logits by {report['check']['max_abs_logit_diff']:.2e} (tolerance "
                           f"{report['check']['tolerance']:.0e}); this is a bug in the pass")
    return dataclasses.replace(after, passes=program.passes + (report,))
