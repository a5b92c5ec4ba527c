"""JAX -> ONNX for inference functions built from the project's networks: a translator of the
function's jaxpr, traced with a symbolic batch dimension, into an ONNX graph (opset `OPSET`).

It knows the primitives an eval-mode DeepLabv3+ of every backbone lowers to (convolutions,
including grouped and dilated ones, the 3x3/s2 max pool, elementwise arithmetic, selects,
broadcasts, reshapes, concatenation, sums, the gather of the align-corners resize) and refuses
any other with an `ExportError` naming it. Everything that does not depend on the input -- the
weights and what eval-mode BatchNorm computes from them -- is evaluated once here and stored as
initializers, so the graph holds only the input-dependent work. Layouts stay as in JAX (NHWC);
convolutions and pools are wrapped in transposes to ONNX's NCHW.

`jax2onnx` (the maintained converter) was not used: its releases after 0.13.0 require
orbax-checkpoint < 0.11.37 (the project pins 0.12.8), and 0.12.5 and 0.17.1 (installed without
dependencies) both emit a 4-D MaxPool for this max pool, which onnxruntime rejects
("Unsupported pooling size"). See docs/tools.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mgd_jax.runtime.errors import ExportError

OPSET = 17

_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min",
           "pow": "Pow", "ge": "GreaterOrEqual", "gt": "Greater", "le": "LessOrEqual",
           "lt": "Less", "eq": "Equal", "and": "And", "or": "Or"}
_UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "tanh": "Tanh", "logistic": "Sigmoid",
          "sqrt": "Sqrt", "abs": "Abs", "floor": "Floor", "ceil": "Ceil", "not": "Not"}
_IDENTITY = ("copy", "copy_p", "optimization_barrier")
_CALLS = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "checkpoint", "remat")


def _onnx():
    try:
        import onnx
    except ImportError as e:
        raise ExportError("ONNX export needs the onnx package: pip install 'mgd_jax[onnx]'") from e
    return onnx


def _tensor_type(dtype: Any) -> int:
    onnx = _onnx()
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class _Graph:
    """The ONNX graph being built: nodes, initializers, and the symbolic batch size."""

    def __init__(self, batch_dim: Any, input_name: str):
        self.onnx = _onnx()
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._constants: dict[int, tuple[np.ndarray, str]] = {}  # id -> (array kept alive, name)
        self._count = 0
        self.batch_dim = batch_dim
        self.input_name = input_name
        self._batch_tensor: str | None = None

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, array: Any, dtype: Any = None) -> str:
        array = np.asarray(array, dtype=dtype)
        key = id(array)
        if key not in self._constants:
            name = self.fresh("const")
            self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
            self._constants[key] = (array, name)
        return self._constants[key][1]

    def node(self, op: str, inputs: Sequence[str], **attrs: Any) -> str:
        out = self.fresh(op.lower())
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), [out], **attrs))
        return out

    def batch(self) -> str:
        """A 1-D int64 tensor holding the runtime batch size."""
        if self._batch_tensor is None:
            self._batch_tensor = self.node("Shape", [self.input_name], start=0, end=1)
        return self._batch_tensor

    def shape(self, dims: Sequence[Any]) -> str:
        """A 1-D int64 shape tensor; the symbolic batch dimension is read at run time."""
        if all(isinstance(d, int) for d in dims):
            return self.const(np.asarray(dims, np.int64))
        parts, run = [], []
        for d in dims:
            if isinstance(d, int):
                run.append(d)
                continue
            if d != self.batch_dim:
                raise ExportError(f"ONNX export: dimension {d} is neither a constant nor the "
                                  "batch size")
            if run:
                parts.append(self.const(np.asarray(run, np.int64)))
                run = []
            parts.append(self.batch())
        if run:
            parts.append(self.const(np.asarray(run, np.int64)))
        return parts[0] if len(parts) == 1 else self.node("Concat", parts, axis=0)


class _Translator:
    """Walks a jaxpr; a value is a numpy array (known now) or the name of a graph tensor."""

    def __init__(self, graph: _Graph):
        self.g = graph

    def name(self, value: Any) -> str:
        return value if isinstance(value, str) else self.g.const(value)

    def run(self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
        env: dict[Any, Any] = {}

        def read(v):
            return np.asarray(v.val) if isinstance(v, jax.extend.core.Literal) else env[v]

        for var, value in zip(jaxpr.constvars, consts, strict=True):
            env[var] = np.asarray(value)
        for var, value in zip(jaxpr.invars, args, strict=True):
            env[var] = value
        for eqn in jaxpr.eqns:
            inputs = [read(v) for v in eqn.invars]
            if eqn.primitive.name in _CALLS:  # inline: its known parts fold one by one
                inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
                outputs = self.run(getattr(inner, "jaxpr", inner), getattr(inner, "consts", ()),
                                   inputs)
            elif all(not isinstance(x, str) for x in inputs):
                outputs = self.evaluate(eqn, inputs)
            else:
                outputs = self.translate(eqn, inputs)
            for var, value in zip(eqn.outvars, outputs, strict=True):
                env[var] = value
        return [read(v) for v in jaxpr.outvars]

    @staticmethod
    def evaluate(eqn: Any, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Runs an equation whose inputs are all known (weights, BN folding, resize tables)."""
        out = eqn.primitive.bind(*inputs, **eqn.params)
        out = out if eqn.primitive.multiple_results else [out]
        return [np.asarray(o) for o in out]

    def translate(self, eqn: Any, inputs: list[Any]) -> list[Any]:
        prim, p = eqn.primitive.name, eqn.params
        avals = [v.aval for v in eqn.outvars]
        method = getattr(self, f"_{prim}", None)
        if prim in _BINARY:
            out = self.g.node(_BINARY[prim], [self.name(x) for x in inputs])
        elif prim in _UNARY:
            out = self.g.node(_UNARY[prim], [self.name(inputs[0])])
        elif prim in _IDENTITY:
            return list(inputs)
        elif method is not None:
            out = method(inputs, p, eqn)
        else:
            raise ExportError(f"ONNX export: the JAX primitive {prim!r} is not supported "
                              f"(in {eqn})")
        return [out] if len(avals) == 1 else out

    # --- one method per primitive that needs more than a name --------------------------------
    def _rsqrt(self, x, p, eqn):
        return self.g.node("Reciprocal", [self.g.node("Sqrt", [self.name(x[0])])])

    def _integer_pow(self, x, p, eqn):
        exponent = np.asarray(p["y"], eqn.invars[0].aval.dtype)
        return self.g.node("Pow", [self.name(x[0]), self.g.const(exponent)])

    def _select_n(self, x, p, eqn):
        if len(x) != 3 or eqn.invars[0].aval.dtype != np.bool_:
            raise ExportError("ONNX export: select_n with a non-boolean selector")
        # select_n(pred, on_false, on_true); Where(cond, if_true, if_false)
        return self.g.node("Where", [self.name(x[0]), self.name(x[2]), self.name(x[1])])

    def _convert_element_type(self, x, p, eqn):
        if np.dtype(p["new_dtype"]) == eqn.invars[0].aval.dtype:
            return x[0]
        return self.g.node("Cast", [self.name(x[0])], to=_tensor_type(p["new_dtype"]))

    def _broadcast_in_dim(self, x, p, eqn):
        shape, kept = tuple(p["shape"]), tuple(p["broadcast_dimensions"])
        value = self.name(x[0])
        new_axes = [i for i in range(len(shape)) if i not in kept]
        if new_axes:
            value = self.g.node("Unsqueeze", [value, self.g.const(np.asarray(new_axes,
                                                                              np.int64))])
        in_shape = [1] * len(shape)
        for src, dst in enumerate(kept):
            in_shape[dst] = eqn.invars[0].aval.shape[src]
        if all(_same(a, b) for a, b in zip(in_shape, shape, strict=True)):
            return value
        return self.g.node("Expand", [value, self.g.shape(shape)])

    def _reshape(self, x, p, eqn):
        if p.get("dimensions") is not None:
            raise ExportError("ONNX export: reshape with dimensions= is not supported")
        return self.g.node("Reshape", [self.name(x[0]), self.g.shape(p["new_sizes"])])

    def _squeeze(self, x, p, eqn):
        axes = np.asarray(p["dimensions"], np.int64)
        return self.g.node("Squeeze", [self.name(x[0]), self.g.const(axes)])

    def _expand_dims(self, x, p, eqn):
        axes = np.asarray(p["dimensions"], np.int64)
        return self.g.node("Unsqueeze", [self.name(x[0]), self.g.const(axes)])

    def _transpose(self, x, p, eqn):
        return self.g.node("Transpose", [self.name(x[0])], perm=list(p["permutation"]))

    def _concatenate(self, x, p, eqn):
        return self.g.node("Concat", [self.name(v) for v in x], axis=int(p["dimension"]))

    def _reduce_sum(self, x, p, eqn):
        axes = self.g.const(np.asarray(p["axes"], np.int64))
        return self.g.node("ReduceSum", [self.name(x[0]), axes], keepdims=0)

    def _reduce_max(self, x, p, eqn):  # opset 17: ReduceMax takes its axes as an attribute
        return self.g.node("ReduceMax", [self.name(x[0])], axes=list(p["axes"]), keepdims=0)

    def _dot_general(self, x, p, eqn):
        # ONNX Einsum states any dot_general: output = batch dims, lhs free dims, rhs free dims.
        (lc, rc), (lb, rb) = p["dimension_numbers"]
        nl, nr = (len(v.aval.shape) for v in eqn.invars)
        letters = iter("abcdefghijklmnopqrstuvwxyz")
        lhs = [next(letters) for _ in range(nl)]
        rhs = [next(letters) for _ in range(nr)]
        for i, j in zip(list(lc) + list(lb), list(rc) + list(rb), strict=True):
            rhs[j] = lhs[i]
        out = ([lhs[i] for i in lb] + [lhs[i] for i in range(nl) if i not in (*lc, *lb)]
               + [rhs[j] for j in range(nr) if j not in (*rc, *rb)])
        equation = f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"
        return self.g.node("Einsum", [self.name(v) for v in x], equation=equation)

    def _conv_general_dilated(self, x, p, eqn):
        lhs, rhs, out = p["dimension_numbers"]
        if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
            raise ExportError("ONNX export: transposed or batch-grouped convolutions are not "
                              "supported")
        image = self.g.node("Transpose", [self.name(x[0])], perm=list(lhs))
        if isinstance(x[1], str):
            kernel = self.g.node("Transpose", [x[1]], perm=list(rhs))
        else:
            kernel = self.g.const(np.ascontiguousarray(np.transpose(x[1], rhs)))
        low, high = zip(*p["padding"], strict=True)
        if min(low + high) < 0:
            raise ExportError("ONNX export: negative convolution padding is not supported")
        y = self.g.node("Conv", [image, kernel], strides=list(p["window_strides"]),
                        pads=list(low + high), dilations=list(p["rhs_dilation"]),
                        group=int(p["feature_group_count"]))
        y = self.g.node("Transpose", [y], perm=[int(i) for i in np.argsort(out)])
        want = eqn.outvars[0].aval.dtype
        if want != eqn.invars[0].aval.dtype:
            y = self.g.node("Cast", [y], to=_tensor_type(want))
        return y

    def _reduce_window_max(self, x, p, eqn):
        window, strides = tuple(p["window_dimensions"]), tuple(p["window_strides"])
        padding, n = tuple(p["padding"]), len(window)
        trivial = all(window[i] == 1 and strides[i] == 1 and padding[i] == (0, 0)
                      for i in (0, n - 1))
        dilated = any(d != 1 for d in tuple(p["base_dilation"]) + tuple(p["window_dilation"]))
        if not trivial or dilated:
            raise ExportError("ONNX export: reduce_window_max pools only the spatial dims of "
                              f"a channels-last array here; got window {window}")
        to_first = [0, n - 1, *range(1, n - 1)]
        y = self.g.node("Transpose", [self.name(x[0])], perm=to_first)
        low, high = zip(*padding[1:-1], strict=True)
        y = self.g.node("MaxPool", [y], kernel_shape=list(window[1:-1]),
                        strides=list(strides[1:-1]), pads=list(low + high))
        return self.g.node("Transpose", [y], perm=[int(i) for i in np.argsort(to_first)])

    def _gather(self, x, p, eqn):
        """`jnp.take(x, indices, axis)` with known indices -> Gather."""
        operand, indices = x
        dn = p["dimension_numbers"]
        shape = eqn.invars[0].aval.shape
        if (isinstance(indices, str) or len(dn.start_index_map) != 1
                or tuple(dn.collapsed_slice_dims) != tuple(dn.start_index_map)
                or dn.operand_batching_dims or indices.ndim != 2 or indices.shape[1] != 1):
            raise ExportError(f"ONNX export: only a take along one axis is supported ({dn})")
        axis = dn.start_index_map[0]
        sizes = tuple(p["slice_sizes"])
        expected = tuple(1 if i == axis else d for i, d in enumerate(shape))
        offset = tuple(i for i in range(len(shape)) if i != axis)
        if (not all(_same(a, b) for a, b in zip(sizes, expected, strict=True))
                or tuple(dn.offset_dims) != offset):
            raise ExportError(f"ONNX export: only a take along one axis is supported ({dn})")
        flat = indices[:, 0].astype(np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= shape[axis]):
            raise ExportError("ONNX export: gather indices out of range")
        return self.g.node("Gather", [self.name(operand), self.g.const(flat)], axis=int(axis))


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # InconclusiveDimensionOperation
        return False


def to_onnx(fn: Callable[[jax.Array], jax.Array], input_shape: Sequence[int], *,
            input_name: str = "images", output_name: str = "logits",
            dtype: Any = jnp.float32) -> Any:
    """The `onnx.ModelProto` of `fn` (one array in, one out) for inputs of shape
    (batch, *input_shape) with a symbolic batch named "batch"; checked by `onnx.checker`."""
    onnx = _onnx()
    batch = jax.export.symbolic_shape("batch")[0]
    spec = jax.ShapeDtypeStruct((batch, *input_shape), dtype)
    closed = jax.make_jaxpr(fn)(spec)
    if len(closed.jaxpr.outvars) != 1:
        raise ExportError("ONNX export: the function must return one array")
    graph = _Graph(batch, input_name)
    translator = _Translator(graph)
    (result,) = translator.run(closed.jaxpr, closed.consts, [input_name])
    graph.nodes.append(onnx.helper.make_node("Identity", [translator.name(result)],
                                             [output_name]))
    out_aval = closed.jaxpr.outvars[0].aval

    def value_info(name, aval):
        dims = ["batch" if not isinstance(d, int) else d for d in aval.shape]
        return onnx.helper.make_tensor_value_info(name, _tensor_type(aval.dtype), dims)

    model = onnx.helper.make_model(
        onnx.helper.make_graph(graph.nodes, "mgd_jax", [value_info(input_name, spec)],
                               [value_info(output_name, out_aval)], graph.initializers),
        opset_imports=[onnx.helper.make_opsetid("", OPSET)], producer_name="mgd_jax",
    )
    model.ir_version = min(model.ir_version, 10)  # readable by onnxruntime releases of 2024+
    onnx.checker.check_model(model)
    return model
