"""The CPU target: each traced graph lowered from its jaxpr to an ONNX model for ONNX Runtime.

tandemc lowers the primitives its graphs use itself (one rule per JAX primitive, in the table below) instead of
depending on a converter package: the graphs use ~45 primitives, and owning their lowering lets the named
tandemc primitives (tandemc/primitives.py) map straight to native operators (Gather, GatherND, GatherElements,
ScatterND, TopK). Weights are initializers stored as external data pointing into the artifact's one
`weights.safetensors` (safetensors keeps raw little-endian tensors at known offsets), so every graph shares it.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from jax.extend import core
from onnx import TensorProto, helper, numpy_helper

from tandemc.errors import TandemcError
from tandemc.passes import quantize
from tandemc.primitives import PREFIX, quant_block, softmax
from tandemc.trace import Graph

OPSET = 23
# Operator profiles. cpu: ONNX Runtime's fused kernels (opset-23 RMSNormalization and Attention, com.microsoft
# GroupQueryAttention, RotaryEmbedding and SkipSimplifiedLayerNormalization). gpu: what TensorRT's ONNX parser
# takes (targets/tensorrt.py): standard operators only, the fused primitives inlined from their JAX definitions,
# per-channel int8 as per-axis DequantizeLinear.
PROFILES = ("cpu", "gpu")
# Session settings the graphs need, recorded in the manifest for every runtime: quantized matmuls fused into
# MatMulNBits compute in float32 (level 1) as the reference's dequant_matmul does, or quantize their activations to
# int8 (level 4) as its int8_activation_matmul does. ONNX Runtime sets the level per session, so one artifact
# holds one kind.
ACCURACY_LEVEL = "session.qdq_matmulnbits_accuracy_level"


def session_config(params) -> dict[str, str]:
    """The manifest's onnx_session_config for a Program's parameters."""
    kinds = quantize.kinds(params)
    if len(kinds) > 1:
        raise TandemcError("this Program mixes weight-only and int8-activation quantized matrices; ONNX Runtime "
                           "chooses float or int8 activations per session: quantize every model with the same "
                           "activations= option")
    return {ACCURACY_LEVEL: "4" if "qa" in kinds else "1"}


ONNX_DTYPES = {
    "float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16,
    "int32": TensorProto.INT32, "int64": TensorProto.INT64, "int8": TensorProto.INT8, "int4": TensorProto.INT4,
    "uint8": TensorProto.UINT8, "uint32": TensorProto.UINT32, "bool": TensorProto.BOOL,
}


def onnx_dtype(dtype) -> int:
    name = np.dtype(dtype).name
    if name not in ONNX_DTYPES:
        raise TandemcError(f"the ONNX lowering has no type for {name}")
    return ONNX_DTYPES[name]


class Builder:
    """Accumulates nodes and initializers with fresh names; constants are deduplicated."""

    def __init__(self, parent: "Builder | None" = None):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counter = parent._counter if parent else [0]  # names stay unique across subgraphs
        self._consts: dict[tuple, str] = {}
        # Broadcasts are left to ONNX's numpy-style broadcasting where the consumer is elementwise: a name here
        # holds a tensor of shape real[name] (same rank, some dims 1) standing for its JAX value of shape lazy[name].
        self.lazy: dict[str, tuple[int, ...]] = {}
        self.real: dict[str, tuple[int, ...]] = {}
        self.max_position: int | None = parent.max_position if parent else None  # bound for rotary tables
        self.profile: str = parent.profile if parent else "cpu"  # which operator set (PROFILES)
        self._expanded: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}  # static shapes of the values lowered so far
        self.producer: dict[str, int] = {}  # value → index of the node (in self.nodes) that computes it
        self._reshaped: dict[str, str] = {}  # Reshape output → the value it reshapes (chains collapse)
        self.memo: dict[tuple, str] = {}  # values a lowering computes once per graph (e.g. per-row sequence lengths)
        # where the JAX code being lowered sits (jax.named_scope, e.g. "draft0", "verify"): node names carry it,
        # so ONNX Runtime's profiler attributes time to parts of the step
        self.scope: str = parent.scope if parent else ""

    def materialize(self, name: str) -> str:
        if name not in self.lazy:
            return name
        if name not in self._expanded:
            self._expanded[name] = self.op1("Expand", [name, self.i64(self.lazy[name])])
        return self._expanded[name]

    def fresh(self, hint: str) -> str:
        self._counter[0] += 1
        return f"{hint}_{self._counter[0]}"

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        outputs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        name = f"{self.scope}/{op_type}_{self._counter[0]}" if self.scope else f"{op_type}_{self._counter[0]}"
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain or None, **attrs))
        for name in outputs:
            self.producer[name] = len(self.nodes) - 1
        return outputs

    def op1(self, op_type: str, inputs: list[str], **attrs) -> str:
        return self.op(op_type, inputs, **attrs)[0]

    def const(self, value, dtype=None) -> str:
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            if array.dtype.name == "bfloat16":
                tensor = helper.make_tensor(name, TensorProto.BFLOAT16, array.shape,
                                            array.view(np.uint16).tobytes(), raw=True)
            else:
                tensor = numpy_helper.from_array(array, name)
            self.initializers.append(tensor)
            self._consts[key] = name
        return self._consts[key]

    def i64(self, values) -> str:
        return self.const(np.asarray(values, np.int64).reshape(-1))

    def cast(self, name: str, dtype) -> str:
        return self.op1("Cast", [name], to=onnx_dtype(dtype))

    def reshape(self, name: str, shape) -> str:
        """Reshape, skipping chains (reshape of a reshape reads the original) and no-ops (same shape back)."""
        shape = tuple(int(d) for d in shape)
        source = self._reshaped.get(name, name)
        if self.shapes.get(source) == shape:
            return source
        out = self.op1("Reshape", [source, self.i64(shape)])
        self._reshaped[out] = source
        self.shapes[out] = shape
        return out


# --- lowering a jaxpr -----------------------------------------------------------------------------------------

Rule = Callable[[Builder, core.JaxprEqn, list], list]
RULES: dict[str, Rule] = {}
NAMED: dict[str, Rule] = {}  # tandemc primitives by name (the jit's name)


def lower_jaxpr(b: Builder, jaxpr: core.Jaxpr, consts, inputs: list[str]) -> list[str]:
    env: dict = {}

    def read(v):
        if isinstance(v, core.Literal):
            return b.const(np.asarray(v.val, dtype=v.aval.dtype))
        return env[v]

    for var, value in zip(jaxpr.constvars, consts):
        env[var] = b.const(np.asarray(value))
    env.update(zip(jaxpr.invars, inputs))
    for var, name in zip(jaxpr.invars, inputs):
        if name not in b.lazy:
            b.shapes.setdefault(name, tuple(aval(var).shape))
    outer_scope = b.scope
    for eqn in jaxpr.eqns:
        b.scope = "/".join(filter(None, [outer_scope, str(eqn.source_info.name_stack)]))
        name = eqn.primitive.name
        if name not in RULES:
            raise TandemcError(f"the ONNX lowering has no rule for JAX primitive {name!r}")
        ins = [read(v) for v in eqn.invars]
        if all(0 in aval(v).shape for v in eqn.outvars):  # empty values (γ = 0 drafts) are constants
            outs = [b.const(np.zeros(aval(v).shape, aval(v).dtype)) for v in eqn.outvars]
        elif name in BROADCASTING or (name == "broadcast_in_dim"):
            outs = RULES[name](b, eqn, ins)
            if name != "broadcast_in_dim" and any(i in b.lazy for i in ins):
                shapes = [b.real.get(i, tuple(aval(v).shape)) for i, v in zip(ins, eqn.invars)]
                b.lazy[outs[0]] = tuple(aval(eqn.outvars[0]).shape)
                b.real[outs[0]] = tuple(np.broadcast_shapes(*shapes))
        else:
            outs = RULES[name](b, eqn, [b.materialize(i) for i in ins])
        for var, out in zip(eqn.outvars, outs):
            if not isinstance(var, core.DropVar):
                env[var] = out
                if out not in b.lazy:
                    b.shapes.setdefault(out, tuple(aval(var).shape))
    b.scope = outer_scope
    return [b.materialize(read(v)) for v in jaxpr.outvars]


def rule(*names):
    def register(fn):
        for n in names:
            RULES[n] = fn
        return fn
    return register


def aval(v):
    return v.aval


# Primitives whose ONNX operators broadcast numpy-style, so they accept not-yet-expanded inputs.
BROADCASTING = {"add", "sub", "mul", "max", "min", "pow", "div", "rem", "eq", "ne", "lt", "le", "gt", "ge", "and",
                "or", "xor", "not", "neg", "exp", "log", "sin", "cos", "sqrt", "rsqrt", "tanh", "abs", "floor",
                "ceil", "sign", "logistic", "erf", "select_n", "integer_pow", "square", "convert_element_type"}


def elementwise(op_type):
    return lambda b, eqn, ins: [b.op1(op_type, ins)]


for _jax, _onnx in {"add": "Add", "sub": "Sub", "mul": "Mul", "max": "Max", "min": "Min", "pow": "Pow",
                    "neg": "Neg", "exp": "Exp", "log": "Log", "sin": "Sin", "cos": "Cos", "sqrt": "Sqrt",
                    "tanh": "Tanh", "abs": "Abs", "floor": "Floor", "ceil": "Ceil", "sign": "Sign",
                    "logistic": "Sigmoid", "eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater",
                    "ge": "GreaterOrEqual", "erf": "Erf"}.items():
    RULES[_jax] = elementwise(_onnx)


@rule("div")
def _div(b, eqn, ins):
    return [b.op1("Div", ins)]  # integer Div truncates toward zero in ONNX Runtime, as lax.div does


@rule("rem")
def _rem(b, eqn, ins):
    return [b.op1("Mod", ins, fmod=1)]  # sign of the dividend, as lax.rem


@rule("ne")
def _ne(b, eqn, ins):
    return [b.op1("Not", [b.op1("Equal", ins)])]


@rule("and", "or", "not", "xor")
def _logical(b, eqn, ins):
    is_bool = aval(eqn.invars[0]).dtype == np.bool_
    name = eqn.primitive.name
    op = {"and": "And", "or": "Or", "not": "Not", "xor": "Xor"}[name]
    return [b.op1(op if is_bool else "Bitwise" + op, ins)]


@rule("rsqrt")
def _rsqrt(b, eqn, ins):
    return [b.op1("Reciprocal", [b.op1("Sqrt", ins)])]


@rule("square")
def _square(b, eqn, ins):
    return [b.op1("Mul", [ins[0], ins[0]])]


@rule("integer_pow")
def _integer_pow(b, eqn, ins):
    y = eqn.params["y"]
    if y == 2:
        return [b.op1("Mul", [ins[0], ins[0]])]
    return [b.op1("Pow", [ins[0], b.const(np.asarray(y, aval(eqn.invars[0]).dtype))])]


@rule("stop_gradient", "copy", "copy_p", "optimization_barrier")
def _identity(b, eqn, ins):
    return list(ins)


@rule("select_n")
def _select_n(b, eqn, ins):
    if len(ins) != 3:
        raise TandemcError("the ONNX lowering supports select_n with two cases only")
    pred = ins[0] if aval(eqn.invars[0]).dtype == np.bool_ else b.cast(ins[0], np.bool_)
    if aval(eqn.outvars[0]).dtype == np.bool_:  # ONNX Runtime has no boolean Where kernel
        picked = b.op1("Where", [pred, b.cast(ins[2], np.uint8), b.cast(ins[1], np.uint8)])
        return [b.cast(picked, np.bool_)]
    return [b.op1("Where", [pred, ins[2], ins[1]])]


@rule("clamp")
def _clamp(b, eqn, ins):
    lo, x, hi = ins
    return [b.op1("Min", [b.op1("Max", [x, lo]), hi])]


@rule("convert_element_type")
def _convert(b, eqn, ins):
    if np.dtype(eqn.params["new_dtype"]) == aval(eqn.invars[0]).dtype:
        return list(ins)
    return [b.cast(ins[0], eqn.params["new_dtype"])]


@rule("iota")
def _iota(b, eqn, ins):
    p = eqn.params
    shape, dim = p["shape"], p["dimension"]
    values = np.arange(shape[dim], dtype=p["dtype"]).reshape([-1 if i == dim else 1 for i in range(len(shape))])
    return [b.const(np.broadcast_to(values, shape).copy())]


@rule("broadcast_in_dim")
def _broadcast_in_dim(b, eqn, ins):
    shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    source = tuple(aval(eqn.invars[0]).shape)
    if source == tuple(shape):
        return list(ins)
    real = b.real.get(ins[0], source)  # a lazy input broadcasts from its real (smaller) tensor
    staged = [1] * len(shape)
    for axis, d in zip(dims, real):
        staged[axis] = d
    x = b.reshape(ins[0], staged) if tuple(staged) != real else b.op1("Identity", ins)
    b.lazy[x], b.real[x] = tuple(shape), tuple(staged)
    return [x]


@rule("reshape", "squeeze", "expand_dims")
def _reshape(b, eqn, ins):
    return [b.reshape(ins[0], aval(eqn.outvars[0]).shape)]


@rule("transpose")
def _transpose(b, eqn, ins):
    return [b.op1("Transpose", ins, perm=list(eqn.params["permutation"]))]


@rule("concatenate")
def _concatenate(b, eqn, ins):
    return [b.op1("Concat", ins, axis=eqn.params["dimension"])]


@rule("split")
def _split(b, eqn, ins):
    sizes = eqn.params["sizes"]
    return b.op("Split", [ins[0], b.i64(sizes)], n_out=len(sizes), axis=eqn.params["axis"])


@rule("stack")
def _stack(b, eqn, ins):
    axis = eqn.params["axis"]
    parts = [b.op1("Unsqueeze", [x, b.i64([axis])]) for x in ins]
    return [b.op1("Concat", parts, axis=axis)]


@rule("slice")
def _slice(b, eqn, ins):
    p = eqn.params
    rank = len(p["start_indices"])
    steps = p["strides"] or (1,) * rank
    return [b.op1("Slice", [ins[0], b.i64(p["start_indices"]), b.i64(p["limit_indices"]), b.i64(range(rank)),
                            b.i64(steps)])]


def _clamped_starts(b, starts: list[str], operand_shape, window_shape) -> str:
    """XLA clamps dynamic starts so the window fits; ONNX does not, so clamp explicitly. → int64 [rank]."""
    parts = [b.reshape(b.cast(s, np.int64), [1]) for s in starts]
    stacked = b.op1("Concat", parts, axis=0)
    upper = b.i64([d - w for d, w in zip(operand_shape, window_shape)])
    return b.op1("Min", [b.op1("Max", [stacked, b.i64([0] * len(starts))]), upper])


@rule("dynamic_slice")
def _dynamic_slice(b, eqn, ins):
    sizes = eqn.params["slice_sizes"]
    starts = _clamped_starts(b, ins[1:], aval(eqn.invars[0]).shape, sizes)
    ends = b.op1("Add", [starts, b.i64(sizes)])
    return [b.op1("Slice", [ins[0], starts, ends, b.i64(range(len(sizes)))])]


@rule("dynamic_update_slice")
def _dynamic_update_slice(b, eqn, ins):
    window = aval(eqn.invars[1]).shape
    starts = _clamped_starts(b, ins[2:], aval(eqn.invars[0]).shape, window)
    grid = np.stack(np.meshgrid(*[np.arange(w) for w in window], indexing="ij"), axis=-1).astype(np.int64)
    indices = b.op1("Add", [b.const(grid), starts])
    return [b.op1("ScatterND", [ins[0], indices, ins[1]])]


def _reduce(op_type):
    def lower(b, eqn, ins):
        axes = b.i64(eqn.params["axes"])
        dtype = aval(eqn.invars[0]).dtype
        if dtype == np.bool_:  # any/all as max/min over 0/1
            x = b.cast(ins[0], np.int32)
            return [b.cast(b.op1(op_type, [x, axes], keepdims=0), np.bool_)]
        return [b.op1(op_type, [ins[0], axes], keepdims=0)]
    return lower


RULES.update({"reduce_sum": _reduce("ReduceSum"), "reduce_max": _reduce("ReduceMax"),
              "reduce_min": _reduce("ReduceMin"), "reduce_prod": _reduce("ReduceProd"),
              "reduce_or": _reduce("ReduceMax"), "reduce_and": _reduce("ReduceMin")})


@rule("argmax", "argmin")
def _argmax(b, eqn, ins):
    (axis,) = eqn.params["axes"]
    op = "ArgMax" if eqn.primitive.name == "argmax" else "ArgMin"
    x = b.cast(ins[0], np.int32) if aval(eqn.invars[0]).dtype == np.bool_ else ins[0]  # ArgMax takes no bool
    return [b.cast(b.op1(op, [x], axis=axis, keepdims=0, select_last_index=0), eqn.params["index_dtype"])]


@rule("top_k")
def _top_k(b, eqn, ins):
    values, indices = b.op("TopK", [ins[0], b.i64([eqn.params["k"]])], n_out=2, axis=-1, largest=1, sorted=1)
    return [values, b.cast(indices, aval(eqn.outvars[1]).dtype)]


@rule("cumsum")
def _cumsum(b, eqn, ins):
    return [b.op1("CumSum", [ins[0], b.const(np.asarray(eqn.params["axis"], np.int64))],
                  reverse=int(eqn.params["reverse"]))]


@rule("dot_general")
def _dot_general(b, eqn, ins):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = aval(eqn.invars[0]), aval(eqn.invars[1])
    out_dtype = aval(eqn.outvars[0]).dtype
    if not lb and not rb and tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and rhs.ndim == 2:
        out = b.op1("MatMul", ins)  # x @ W: the weight matmuls
    else:
        letters = iter("abcdefghijklmnopqrstuvwxyz")
        lsub = [next(letters) for _ in range(lhs.ndim)]
        rsub = [None] * rhs.ndim
        for l_axis, r_axis in zip(list(lb) + list(lc), list(rb) + list(rc)):
            rsub[r_axis] = lsub[l_axis]
        rsub = [s or next(letters) for s in rsub]
        batch = [lsub[a] for a in lb]
        free_l = [lsub[a] for a in range(lhs.ndim) if a not in lb and a not in lc]
        free_r = [rsub[a] for a in range(rhs.ndim) if a not in rb and a not in rc]
        equation = f"{''.join(lsub)},{''.join(rsub)}->{''.join(batch + free_l + free_r)}"
        out = b.op1("Einsum", ins, equation=equation)
    if np.dtype(out_dtype) != lhs.dtype:
        out = b.cast(out, out_dtype)
    return [out]


@rule("jit", "pjit", "closed_call", "core_call", "remat", "checkpoint")
def _call(b, eqn, ins):
    name = eqn.params.get("name", "")
    if name in NAMED:
        return NAMED[name](b, eqn, ins)
    closed = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
    if isinstance(closed, core.ClosedJaxpr):
        return lower_jaxpr(b, closed.jaxpr, closed.consts, ins)
    return lower_jaxpr(b, closed, [], ins)


def _subgraph(child: Builder, name: str, inputs, outputs) -> onnx.GraphProto:
    """A branch or loop body with only the nodes its outputs need and the constants those read: ONNX Runtime warns
    on every load about initializers nothing reads."""
    nodes = _live(child.nodes, [o.name for o in outputs])
    used = set().union(*(_reads(node) for node in nodes))
    return helper.make_graph(nodes, name, inputs, outputs,
                             initializer=[t for t in child.initializers if t.name in used])


@rule("cond")
def _cond(b, eqn, ins):
    """lax.cond with two branches → ONNX If (branch 1 when the index is 1); branches read outer names directly."""
    branches = eqn.params["branches"]
    if len(branches) != 2:
        raise TandemcError("the ONNX lowering supports two-way conditionals only")
    subgraphs = []
    for closed in (branches[1], branches[0]):
        child = Builder(parent=b)
        outs = lower_jaxpr(child, closed.jaxpr, closed.consts, list(ins[1:]))
        results = []
        for out, var in zip(outs, closed.jaxpr.outvars):
            name = child.op1("Identity", [out])
            results.append(value_info(name, aval(var).shape, aval(var).dtype))
        subgraphs.append(_subgraph(child, b.fresh("branch"), [], results))
    pred = b.cast(ins[0], np.bool_)
    return b.op("If", [pred], n_out=len(eqn.outvars), then_branch=subgraphs[0], else_branch=subgraphs[1])


@rule("while")
def _while(b, eqn, ins):
    """lax.while_loop → ONNX Loop without a trip count: the condition is evaluated before the loop and again at the
    end of each iteration; the loop-carried values are the while's carry. Bodies read outer names directly."""
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts, init = list(ins[:nc]), list(ins[nc:nc + nb]), list(ins[nc + nb:])
    cond, body = p["cond_jaxpr"], p["body_jaxpr"]
    carry = [aval(v) for v in eqn.invars[nc + nb:]]
    first = lower_jaxpr(b, cond.jaxpr, cond.consts, cond_consts + init)[0]
    child = Builder(parent=b)
    names = [b.fresh("carry") for _ in init]
    new = lower_jaxpr(child, body.jaxpr, body.consts, body_consts + names)
    again = lower_jaxpr(child, cond.jaxpr, cond.consts, cond_consts + new)[0]
    outs = [child.op1("Identity", [name]) for name in [again, *new]]
    iteration, condition = b.fresh("iteration"), b.fresh("condition")
    graph = _subgraph(
        child, b.fresh("loop_body"),
        [value_info(iteration, (), np.int64), value_info(condition, (), np.bool_)]
        + [value_info(n, a.shape, a.dtype) for n, a in zip(names, carry)],
        [value_info(outs[0], (), np.bool_)] + [value_info(o, a.shape, a.dtype) for o, a in zip(outs[1:], carry)])
    return b.op("Loop", ["", first, *init], n_out=len(init), body=graph)


@rule("custom_jvp_call", "custom_vjp_call")
def _custom_call(b, eqn, ins):
    closed = eqn.params.get("call_jaxpr") or eqn.params.get("fun_jaxpr")
    return lower_jaxpr(b, closed.jaxpr, closed.consts, ins)


# --- the named tandemc primitives -----------------------------------------------------------------------------

def named(name):
    def register(fn):
        NAMED[PREFIX + name] = fn
        return fn
    return register


@named("embed")
def _embed(b, eqn, ins):
    return [b.op1("Gather", ins, axis=0)]


@named("take_along_last")
def _take_along_last(b, eqn, ins):
    return [b.op1("GatherElements", ins, axis=aval(eqn.invars[0]).ndim - 1)]


@named("take_columns")
def _take_columns(b, eqn, ins):
    return [b.op1("Gather", ins, axis=-1)]


@named("take_rows")
def _take_rows(b, eqn, ins):
    index = b.op1("Unsqueeze", [b.cast(ins[1], np.int64), b.i64([1])])
    return [b.op1("GatherND", [ins[0], index], batch_dims=1)]


def _clamped(b, index: str, limit: int, dtype=np.int64) -> str:
    """index as `dtype` clamped into 0..limit, as XLA clamps a dynamic_update_slice's start (only finished rows,
    whose caches and outputs are never read again, reach past the end)."""
    return b.op1("Min", [b.op1("Max", [b.cast(index, dtype), b.const(np.zeros(1, dtype))]),
                         b.const(np.full(1, limit, dtype))])


@named("write_block")
def _write_block(b, eqn, ins):
    buffer, block = aval(eqn.invars[0]), aval(eqn.invars[1])
    batch, length = block.shape[0], block.shape[1]
    start = _clamped(b, ins[2], buffer.shape[1] - length)
    rows, offsets = np.indices((batch, length), dtype=np.int64)
    positions = b.op1("Add", [b.const(offsets), b.op1("Unsqueeze", [start, b.i64([1])])])
    indices = b.op1("Concat", [b.op1("Unsqueeze", [b.const(rows), b.i64([2])]),
                               b.op1("Unsqueeze", [positions, b.i64([2])])], axis=2)
    update = ins[1] if block.dtype == buffer.dtype else b.cast(ins[1], buffer.dtype)
    return [b.op1("ScatterND", [ins[0], indices, update])]


@named("write_cache")
def _write_cache(b, eqn, ins):
    """ScatterND of the block [B, T, KV, hd] as it comes, at indices (row, head, position) of the [B, KV, S, hd]
    cache: no transpose."""
    cache, block = aval(eqn.invars[0]), aval(eqn.invars[1])
    batch, length, kv = block.shape[:3]
    start = _clamped(b, ins[2], cache.shape[2] - length)
    rows, offsets, heads = np.indices((batch, length, kv), dtype=np.int64)
    positions = b.op1("Add", [b.const(offsets), b.op1("Unsqueeze", [start, b.i64([1, 2])])])
    indices = b.op1("Concat", [b.const(rows[..., None]), b.const(heads[..., None]),
                               b.op1("Unsqueeze", [positions, b.i64([3])])], axis=3)
    update = ins[1] if block.dtype == cache.dtype else b.cast(ins[1], cache.dtype)
    return [b.op1("ScatterND", [ins[0], indices, update])]


def literal(var) -> float | None:
    return float(var.val) if isinstance(var, core.Literal) else None


@named("rms_norm")
def _rms_norm(b, eqn, ins):
    eps = literal(eqn.invars[2])
    x = aval(eqn.invars[0])
    if eps is None or x.dtype != np.float32 or b.profile != "cpu":
        return _inline(b, eqn, ins)
    scale = ins[1] if aval(eqn.invars[1]).dtype == np.float32 else b.cast(ins[1], np.float32)
    index = b.producer.get(ins[0])
    add = b.nodes[index] if index is not None else None
    if add is not None and add.op_type == "Add" and all(b.shapes.get(i) == tuple(x.shape) for i in add.input):
        # the residual add and the norm after it: one SkipSimplifiedLayerNormalization, which also returns the sum
        normed = b.fresh("skipsimplifiedlayernormalization")
        b.nodes[index] = helper.make_node("SkipSimplifiedLayerNormalization", [*add.input, scale],
                                          [normed, "", "", add.output[0]], name=add.name, domain="com.microsoft",
                                          epsilon=eps)
        b.producer[normed] = index
        return [normed]
    return [b.op1("RMSNormalization", [ins[0], scale], axis=-1, epsilon=eps, stash_type=1)]


@named("softmax")
def _softmax(b, eqn, ins):
    return [b.op1("Softmax", ins, axis=-1)]


def _rotary_tables(b, theta: float, dim: int, length: int) -> list[str]:
    """cos and sin [length, dim/2] of RoPE's angles, as primitives.rope computes them, for ONNX Runtime's kernels."""
    half = dim // 2
    inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, 2 * half, 2, dtype=np.float32) / np.float32(2 * half))))
    angles = np.arange(length, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    return [b.const(np.cos(angles)), b.const(np.sin(angles))]


@named("rope")
def _rope(b, eqn, ins):
    theta = literal(eqn.invars[2])
    x = aval(eqn.invars[0])
    if theta is None or x.dtype != np.float32 or b.max_position is None or b.profile != "cpu":
        return _inline(b, eqn, ins)
    batch, length, heads, dim = x.shape
    # positions past the table only occur for finished rows (whose outputs are discarded): clamp them into it
    positions = _clamped(b, ins[1], b.max_position - 1)
    flat = b.reshape(ins[0], [batch, length, heads * dim])
    out = b.op1("RotaryEmbedding", [flat, positions, *_rotary_tables(b, theta, dim, b.max_position)],
                domain="com.microsoft", interleaved=0, num_heads=heads)
    return [b.reshape(out, x.shape)]


def _inline(b, eqn, ins):
    closed = eqn.params["jaxpr"]
    return lower_jaxpr(b, closed.jaxpr, closed.consts, ins)


@named("attention")
def _attention(b, eqn, ins):
    """ONNX Attention (opset 23) on [B, H, T, hd] queries over [B, KV, S, hd] keys/values: one kernel per layer."""
    q, k = aval(eqn.invars[0]), aval(eqn.invars[1])
    if q.dtype != np.float32 or k.dtype != np.float32 or b.profile != "cpu":
        return _inline(b, eqn, ins)
    batch, length, heads, dim = q.shape
    kv, keys = k.shape[1], k.shape[2]
    by_head = b.op1("Transpose", [ins[0]], perm=[0, 2, 1, 3])
    out = b.op1("Attention", [by_head, ins[1], ins[2], b.reshape(ins[3], [batch, 1, length, keys])],
                q_num_heads=heads, kv_num_heads=kv, scale=float(dim ** -0.5))
    return [b.reshape(b.op1("Transpose", [out], perm=[0, 2, 1, 3]), [batch, length, heads * dim])]


# ONNX Runtime's GroupQueryAttention takes a block of several new tokens on top of a cache only for one row, and
# rotates only heads of a multiple of 16 values.
GQA_HEAD_MULTIPLE = 16


def _split_source(b, pieces: list[str]) -> str | None:
    """The tensor `pieces` were split from, in order, along its last axis, if they are all of one Split's outputs."""
    index = b.producer.get(pieces[0])
    node = b.nodes[index] if index is not None else None
    if node is None or node.op_type != "Split" or list(node.output) != pieces:
        return None
    axis = next(a.i for a in node.attribute if a.name == "axis")
    source = node.input[0]
    return source if axis in (-1, len(b.shapes.get(source, ())) - 1) else None


@named("cached_attention")
def _cached_attention(b, eqn, ins):
    """com.microsoft GroupQueryAttention: RoPE, the cache write and causal attention over each row's valid prefix in
    one kernel. Bound to the same buffer as its output (tandemc.runtime does), the cache is updated in place."""
    q, cache = aval(eqn.invars[0]), aval(eqn.invars[3])
    theta = literal(eqn.invars[6])
    batch, length, heads, dim = q.shape
    kv, keys = cache.shape[1], cache.shape[2]
    if (b.profile != "cpu" or q.dtype != np.float32 or cache.dtype != np.float32 or theta is None
            or dim % GQA_HEAD_MULTIPLE or (batch > 1 and length > 1)):
        return _inline(b, eqn, ins)
    # the kernel places the block at seqlens_k + 1 - T: the index of each row's last new token, clamped like
    # write_cache (rows past the end are finished, their outputs unused)
    key = ("seqlens_k", ins[5], length, keys)
    if key not in b.memo:
        b.memo[key] = b.op1("Add", [_clamped(b, ins[5], keys - length, np.int32), b.const(np.int32(length - 1))])
    qkv = [b.reshape(ins[0], [batch, length, heads * dim]), b.reshape(ins[1], [batch, length, kv * dim]),
           b.reshape(ins[2], [batch, length, kv * dim])]
    packed = _split_source(b, qkv)
    if packed is not None:  # Q, K and V are the pieces of one fused matmul (fuse_qkv): the kernel takes it whole
        qkv = [packed, "", ""]
    out, new_k, new_v = b.op(
        "GroupQueryAttention", [*qkv, ins[3], ins[4], b.memo[key], b.const(np.int32(keys)),
                                *_rotary_tables(b, theta, dim, keys)],
        n_out=3, domain="com.microsoft", num_heads=heads, kv_num_heads=kv, do_rotary=1, rotary_interleaved=0,
        scale=float(dim ** -0.5))
    return [out, new_k, new_v]


@named("dequant_matmul")
def _dequant_matmul(b, eqn, ins):
    """Blocked DequantizeLinear (axis 0, zero point 0) feeding MatMul: ONNX Runtime fuses the pair into MatMulNBits
    where its kernel takes the block size, and otherwise dequantizes on the fly from the stored integers."""
    x, q, scale = (aval(v) for v in eqn.invars)
    if x.dtype != np.float32:
        return _inline(b, eqn, ins)
    block = quant_block(q.shape[0], scale.shape[0])
    if b.profile == "gpu" and scale.shape[0] == 1:  # per output channel: TensorRT's per-axis form
        weight = b.op1("DequantizeLinear", [ins[1], b.reshape(ins[2], [scale.shape[1]])], axis=1)
    else:
        weight = b.op1("DequantizeLinear", [ins[1], ins[2]], axis=0, block_size=block)
    return [b.op1("MatMul", [ins[0], weight])]


@named("int8_activation_matmul")
def _int8_activation_matmul(b, eqn, ins):
    """The same DequantizeLinear + MatMul pair: ONNX Runtime fuses it into MatMulNBits, which at the session's
    accuracy level 4 (session_config) quantizes the activations per block exactly as the primitive does."""
    if aval(eqn.invars[0]).dtype != np.float32 or b.profile != "cpu":
        raise TandemcError("int8 activations follow ONNX Runtime's CPU kernels (MatMulNBits, accuracy level 4); for "
                           "the gpu target quantize weights only (activations=float)")
    return _dequant_matmul(b, eqn, ins)


@named("sort_descending")
def _sort_descending(b, eqn, ins):
    x = aval(eqn.invars[0])
    return [b.op("TopK", [ins[0], b.i64([x.shape[-1]])], n_out=2, axis=-1, largest=1, sorted=1)[0]]


@named("filter_threshold")
def _filter_threshold(b, eqn, ins):
    """The cpu profile sorts the vocabulary (TopK); TensorRT's TopK stops at K = 3840 and vocabularies are
    32k-256k, so the gpu profile finds the thresholds by bisection instead."""
    if b.profile != "gpu":
        return _inline(b, eqn, ins)
    closed = jax.make_jaxpr(threshold_by_bisection)(*(jax.ShapeDtypeStruct(aval(v).shape, aval(v).dtype)
                                                      for v in eqn.invars))
    return lower_jaxpr(b, closed.jaxpr, closed.consts, ins)


# Halvings of the row's logit range: a bisected threshold is exact unless another logit lies within range·2^-32 of
# it, far inside the rounding that `verify` allows a sampled decision (a near-tie by sampling.filter_margin).
BISECTION_STEPS = 32


def threshold_by_bisection(z, top_k, top_p):
    """primitives.filter_threshold without sorting: per filter, 32 unrolled halvings of [min, max] of the logits
    (one count or one masked sum each; loop-free, as TensorRT wants prefill/step graphs), behind a conditional that
    runs it only where the filter is on."""
    vocab = z.shape[-1]
    kth = jax.lax.cond((top_k > 0) & (top_k < vocab), _kth_largest, _no_threshold, z, top_k)
    z = jnp.where(z >= kth, z, -jnp.inf)
    edge = jax.lax.cond(top_p < 1.0, _nucleus_edge, _no_threshold, z, top_p)
    return jnp.maximum(kth, edge)


def _bounds(z):
    """The smallest and largest logits above -inf (masked tokens)."""
    finite = z > -jnp.inf
    hi = jnp.max(jnp.where(finite, z, -jnp.inf), axis=-1, keepdims=True)
    return jnp.min(jnp.where(finite, z, hi), axis=-1, keepdims=True), hi


def _no_threshold(z, _):
    return jnp.full(z.shape[:-1] + (1,), -jnp.inf, z.dtype)


def _kth_largest(z, k):
    """The k-th largest of z (ties counted), 1 ≤ k < V. Bisection keeps count(z ≥ lo) ≥ k with the answer in
    [lo, hi]; it is then the smallest logit ≥ lo."""
    lo, hi = _bounds(z)
    for _ in range(BISECTION_STEPS):
        mid = lo + (hi - lo) * 0.5
        enough = jnp.sum((z >= mid).astype(jnp.int32), axis=-1, keepdims=True) >= k
        lo, hi = jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)
    return jnp.min(jnp.where(z >= lo, z, jnp.inf), axis=-1, keepdims=True)


def _nucleus_edge(z, top_p):
    """The smallest logit v whose more likely tokens (logit > v) hold less than top_p of the probability. That mass
    falls as v rises; bisection keeps it below top_p at hi with the answer in [lo, hi]; it is then the largest
    logit ≤ hi."""
    probs = softmax(z)
    lo, hi = _bounds(z)
    for _ in range(BISECTION_STEPS):
        mid = lo + (hi - lo) * 0.5
        small = jnp.sum(jnp.where(z > mid, probs, 0.0), axis=-1, keepdims=True) < top_p
        lo, hi = jnp.where(small, lo, mid), jnp.where(small, mid, hi)
    return jnp.max(jnp.where(z <= hi, z, -jnp.inf), axis=-1, keepdims=True)


# --- graphs → models ------------------------------------------------------------------------------------------

def value_info(name: str, shape, dtype) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, onnx_dtype(dtype), list(shape))


def _renamed(node: onnx.NodeProto, rename: dict[str, str]) -> onnx.NodeProto:
    """Apply `rename` to a node's inputs and outputs, and inside its subgraphs (If branches read outer names)."""
    node.input[:] = [rename.get(n, n) for n in node.input]
    node.output[:] = [rename.get(n, n) for n in node.output]
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            for inner in attribute.g.node:
                _renamed(inner, rename)
    return node


def _reads(node: onnx.NodeProto) -> set[str]:
    """Names a node reads, including those its subgraphs (If branches) read from the outer scope."""
    names = set(node.input)
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            for inner in attribute.g.node:
                names |= _reads(inner)
    return names


def _all_nodes(nodes):
    """Every node, including those of subgraphs (If branches, Loop bodies)."""
    for node in nodes:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g.node)


def _live(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    """The nodes some output depends on, in order (collapsed reshapes leave unread nodes behind)."""
    needed, keep = set(outputs), []
    for node in reversed(nodes):
        if needed & set(node.output):
            keep.append(node)
            needed |= _reads(node)
    return keep[::-1]


def _one_reader_per_quantized_weight(nodes: list[onnx.NodeProto], weights: set[str]) -> dict[str, str]:
    """Give each DequantizeLinear its own names for the weights it reads (alias → weight; the aliases point at the
    same bytes of the weights file). ONNX Runtime fuses DequantizeLinear + MatMul into MatMulNBits only where the
    integers and scales have no other reader, and the drafter's weights are read once per unrolled draft step."""
    aliases, seen = {}, set()
    for node in nodes:
        if node.op_type != "DequantizeLinear":
            continue
        for i, name in enumerate(node.input[:2]):
            if name not in weights:
                continue
            if name in seen:
                alias = f"{name}.{len(aliases) + 1}"
                aliases[alias] = name
                node.input[i] = alias
            seen.add(name)
    return aliases


def lower_graph(graph: Graph, weight_locations: dict[str, tuple[str, int, int]],
                profile: str = "cpu") -> tuple[onnx.ModelProto, list[str]]:
    """One graph as an ONNX model whose weights are external data at (file, offset, length), and the weights it
    reads (in the graph's order; the rest of the artifact's weights are not initializers of this file)."""
    closed = jax.make_jaxpr(graph.fn)(*graph.arg_structs())
    b = Builder()
    b.max_position = graph.max_position
    b.profile = profile
    weight_names = [w.name for w in graph.weights]
    input_names = [t.name for t in graph.inputs]
    outs = lower_jaxpr(b, closed.jaxpr, closed.consts, weight_names + input_names)
    # Name each output on the node that computes it, so a runtime can bind a cache output to its input's buffer
    # and the last write lands in place; an Identity only where a value leaves twice or is an input or constant.
    produced = {o for node in b.nodes for o in node.output}
    rename, extra = {}, []
    for out, spec in zip(outs, graph.outputs):
        if out in produced and out not in rename:
            rename[out] = spec.name
        else:
            extra.append(helper.make_node("Identity", [out], [spec.name]))
    nodes = _live([_renamed(node, rename) for node in b.nodes] + extra, [t.name for t in graph.outputs])
    aliases = _one_reader_per_quantized_weight(nodes, set(weight_names)) if profile == "cpu" else {}
    used = set().union(*(_reads(node) for node in nodes))
    specs = {spec.name: spec for spec in graph.weights}
    weights = []
    for name in [w for w in weight_names if w in used] + list(aliases):  # unread: e.g. prefill's drafter
        spec = specs[aliases.get(name, name)]
        file, offset, length = weight_locations[spec.name]
        tensor = onnx.TensorProto(name=name, dims=list(spec.shape), data_type=onnx_dtype(spec.dtype),
                                  data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", file), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        weights.append(tensor)
    constants = [t for t in b.initializers if t.name in used]  # dead nodes' constants: ONNX Runtime warns of them
    body = helper.make_graph(nodes, graph.key, [value_info(t.name, t.shape, t.dtype) for t in graph.inputs],
                             [value_info(t.name, t.shape, t.dtype) for t in graph.outputs],
                             initializer=weights + constants)
    domains = [helper.make_opsetid("", OPSET)]
    if any(node.domain == "com.microsoft" for node in _all_nodes(nodes)):
        domains.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(body, opset_imports=domains, producer_name="tandemc", ir_version=10)
    return model, [w for w in weight_names if w in used]


def lower(graphs: list[Graph], weight_locations: dict[str, tuple[str, int, int]],
          profile: str = "cpu") -> tuple[dict[str, bytes], dict[str, list[str]]]:
    """`<key>.onnx` for every graph, and the weights each reads (by graph key); `generate` (its while loops as ONNX Loop) for the cpu profile only, since the
    gpu profile keeps graphs loop-free for TensorRT, and only with float weights: ONNX Runtime 1.32 fails to fuse a
    quantized matmul inside a Loop body whose weights live in the outer graph ("Missing required weight")."""
    files, reads = {}, {}
    for graph in graphs:
        quantized = any(w.dtype in ("int8", "int4") for w in graph.weights)
        if graph.name == "generate" and (profile != "cpu" or quantized):
            continue
        model, reads[graph.key] = lower_graph(graph, weight_locations, profile)
        files[graph.key + ".onnx"] = model.SerializeToString()
    return files, reads
