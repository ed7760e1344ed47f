"""Quantize a float Relax module and cut out the layers VTA runs.

The flow, on the module the ONNX frontend imports:

1. **Find layers.** A layer starts at a ``conv2d`` (groups 1, batch 1, constant weights) or a
   ``matmul`` with constant weights, and takes along what VTA's epilogue can do: batch norms and
   constant bias adds (folded into the weights and the bias), one residual add of another
   tensor, and a ReLU or a clip to [0, hi] such as ReLU6 (the clip's bounds). Every tensor
   inside a layer has one user.
2. **Calibrate.** The float module, compiled for the build host, returns max |x| of every tensor
   at a layer boundary over the calibration samples.
3. **Quantize.** Every boundary tensor gets a power-of-two scale ``2**e`` covering its range in
   int8 (-127..127, symmetric: DMA padding is zero); the weights of a layer one per-tensor
   power-of-two scale. The accumulator then has scale ``2**(e_x + e_w)``, the bias is rounded to
   it, the output requantization is a shift by ``e_y - e_x - e_w``, and a residual with scale
   ``2**e_r`` enters the accumulator multiplied by ``2**(e_r - e_x - e_w)`` when that is 1..64;
   otherwise the add stays on the CPU.
4. **Rewrite.** Each layer becomes ``call_dps_packed("boost.vta.layer", [key, x, (residual)])``
   on int8 tensors in VTA's packed layout; quantize/pack and unpack/dequantize are ordinary
   Relax ops that TVM compiles for the host CPU, and disappear between consecutive layers.

Layers whose input has fewer than ``MIN_CHANNELS`` channels (the RGB stem) stay on the CPU, as
in the original VTA flow.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.errors import BoostError
from vta.bundle import Bundle
from vta.config import VtaConfig
from vta.engine import PACKED_FUNCTION
from vta.lower import ConvSpec, LoweredLayer, blocks, lower

#: Layers with fewer input channels stay on the CPU (padding to the block would waste most MACs).
MIN_CHANNELS = 8
INT8_MAX = 127


@dataclass
class Layer:
    """One candidate VTA layer found in the float module."""

    head: Any  # the conv2d/matmul binding's var
    data: Any  # the input tensor var
    weight: np.ndarray  # float (O, I, KH, KW), batch norms folded in
    bias: np.ndarray  # float (O,)
    dense: bool
    attrs: dict[str, Any]
    internal: list[Any] = field(default_factory=list)  # vars of the absorbed bindings
    before_residual: Any = None  # the var just before the residual add
    residual: Any = None  # the residual tensor var
    residual_end: Any = None  # the var of the residual add
    relu_end: Any = None  # the var of the ReLU after everything
    relu_max: float | None = None  # the ReLU's upper bound (6 for ReLU6), if any
    relu_inner: Any = None  # a bounded ReLU's first half (the maximum with 0)
    end: Any = None  # the layer's output var (settled by ``settle``)
    spec: ConvSpec | None = None
    exponents: dict[str, int] = field(default_factory=dict)

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])


@dataclass(frozen=True)
class Partition:
    """What ``partition`` produced: the rewritten module and the VTA side of the artifact."""

    module: Any
    bundle: Bundle
    report: dict[str, Any]


def _shape(var: Any) -> tuple[int, ...] | None:
    shape = getattr(getattr(var, "ty", None), "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    try:
        return tuple(int(v) for v in shape.values)
    except (TypeError, ValueError):
        return None


def _dtype(var: Any) -> str:
    return str(getattr(getattr(var, "ty", None), "dtype", ""))


class _Graph:
    """The bindings of the main function's dataflow block, with producers and use counts."""

    def __init__(self, func: Any) -> None:
        from tvm import relax

        body = func.body
        if len(body.blocks) != 1 or not isinstance(body.blocks[0], relax.DataflowBlock):
            raise BoostError("--target vta expects the ONNX import's single dataflow block")
        self.bindings = list(body.blocks[0].bindings)
        self.value = {b.var: b.value for b in self.bindings}
        self.uses: Counter[Any] = Counter()
        for b in self.bindings:
            for var in relax.analysis.free_vars(b.value):
                self.uses[var] += 1
        for var in relax.analysis.free_vars(body.body):
            self.uses[var] += 1
        self.users: dict[Any, Any] = {}
        for b in self.bindings:
            for var in relax.analysis.free_vars(b.value):
                self.users[var] = b.var

    def only_user(self, var: Any) -> tuple[Any, Any] | None:
        """(var, call) of the single binding that uses ``var``, if it has exactly one user."""
        if self.uses[var] != 1 or var not in self.users:
            return None
        user = self.users[var]
        return user, self.value[user]


def _op(call: Any) -> str:
    from tvm import relax

    if isinstance(call, relax.Call) and hasattr(call.op, "name"):
        return str(call.op.name)
    return ""


def _const(expr: Any, graph: _Graph) -> np.ndarray | None:
    """The value of a constant, or of a transposed constant (how Gemm weights import)."""
    import tvm

    if isinstance(expr, tvm.ir.Constant):
        return np.asarray(expr.value.numpy())
    if expr in graph.value:
        return _const(graph.value[expr], graph)
    if _op(expr) == "relax.permute_dims":
        inner = _const(expr.args[0], graph)
        if inner is not None:
            axes = expr.attrs.axes
            return inner.transpose([int(a) for a in axes] if axes is not None else None)
    return None


def find_layers(graph: _Graph) -> list[Layer]:
    layers = []
    claimed: set[Any] = set()
    for binding in graph.bindings:
        layer = _head(graph, binding.var, binding.value)
        if layer is None:
            continue
        _extend(graph, layer, claimed)
        layers.append(layer)
    return layers


def _head(graph: _Graph, var: Any, call: Any) -> Layer | None:
    op = _op(call)
    if op == "relax.nn.conv2d":
        a = call.attrs
        shape, weight = _shape(call.args[0]), _const(call.args[1], graph)
        if (
            weight is None
            or shape is None
            or shape[0] != 1
            or int(a.groups) != 1
            or any(int(d) != 1 for d in a.dilation)
            or (a.data_layout, a.kernel_layout) != ("NCHW", "OIHW")
            or shape[1] < MIN_CHANNELS
            or _dtype(call.args[0]) != "float32"
        ):
            return None
        attrs = {
            "shape": shape,
            "stride": tuple(int(s) for s in a.strides),
            "padding": tuple(int(p) for p in a.padding),
        }
        return Layer(
            var, call.args[0], weight.astype(np.float64), np.zeros(weight.shape[0]), False, attrs
        )
    if op == "relax.matmul":
        shape, weight = _shape(call.args[0]), _const(call.args[1], graph)
        if (
            weight is None
            or shape is None
            or len(shape) != 2
            or shape[0] != 1
            or weight.ndim != 2
            or shape[1] < MIN_CHANNELS
            or _dtype(call.args[0]) != "float32"
        ):
            return None
        w = weight.T.astype(np.float64)[:, :, None, None]  # (N, K, 1, 1)
        return Layer(var, call.args[0], w, np.zeros(w.shape[0]), True, {"shape": shape})
    return None


def _extend(graph: _Graph, layer: Layer, claimed: set[Any]) -> None:
    """Absorb batch norms, bias adds, one residual add and a ReLU after the head."""
    from tvm import relax

    var = layer.head
    while (found := graph.only_user(var)) is not None:
        user, call = found
        op = _op(call)
        if op == "relax.nn.batch_norm" and call.args[0].same_as(var):
            params = [_const(arg, graph) for arg in call.args[1:5]]
            item = graph.only_user(user)
            if (
                any(p is None for p in params)
                or item is None
                or not isinstance(item[1], relax.TupleGetItem)
                or int(item[1].index) != 0
                or int(call.attrs.axis) != 1
            ):
                break
            gamma, beta, mean, variance = (np.asarray(p, np.float64) for p in params)
            scale = gamma / np.sqrt(variance + float(call.attrs.epsilon))
            layer.weight = layer.weight * scale[:, None, None, None]
            layer.bias = (layer.bias - mean) * scale + beta
            layer.internal += [var, user]
            var = item[0]
            continue
        if op == "relax.add" and layer.residual is None:
            other = call.args[1] if call.args[0].same_as(var) else call.args[0]
            value = _const(other, graph)
            if value is not None:
                bias = _channel_vector(value, layer.out_channels, layer.dense)
                if bias is None:
                    break
                layer.bias = layer.bias + bias
                layer.internal.append(var)
                var = user
                continue
            if _shape(other) == _shape(var) and _dtype(other) == "float32" and user not in claimed:
                layer.before_residual, layer.residual, layer.residual_end = var, other, user
                claimed.add(user)
                var = user
                continue
            break
        if op == "relax.nn.relu":
            layer.relu_end = user
        elif (clip := _relu6(graph, var, user, call)) is not None:
            layer.relu_end, layer.relu_max = clip
            layer.relu_inner = user
        break
    if layer.residual is None:
        layer.before_residual = var


def _bound(call: Any, op: str, var: Any, graph: _Graph) -> float | None:
    """The scalar bound of ``op(var, bound)``: Clip imports as a maximum and a minimum."""
    if _op(call) != op or not call.args[0].same_as(var):
        return None
    bound = _const(call.args[1], graph)
    return None if bound is None or bound.size != 1 else float(bound.reshape(-1)[0])


def _relu6(graph: _Graph, var: Any, lower: Any, call: Any) -> tuple[Any, float] | None:
    """(end var, upper bound) of a clip of ``var`` to [0, hi] (ReLU6 and the like): ``lower``
    is the var of ``call``, the maximum with 0."""
    if _bound(call, "relax.maximum", var, graph) != 0.0:
        return None
    upper = graph.only_user(lower)
    if upper is None:
        return None
    hi = _bound(upper[1], "relax.minimum", lower, graph)
    return None if hi is None or hi <= 0 else (upper[0], hi)


def _channel_vector(value: np.ndarray, channels: int, dense: bool) -> np.ndarray | None:
    """A constant that adds one value per output channel, as a vector (None: it does not)."""
    shape = value.shape
    if dense:
        if value.size == channels and shape[-1] == channels:
            return value.reshape(-1).astype(np.float64)
        return None
    if value.size == channels and (shape == (channels,) or shape == (1, channels, 1, 1)):
        return value.reshape(-1).astype(np.float64)
    if value.size == 1:
        return np.full(channels, float(value.reshape(-1)[0]))
    return None


def boundary_vars(layers: Sequence[Layer]) -> list[Any]:
    """Every tensor whose range the quantization needs."""
    out: dict[Any, None] = {}
    for layer in layers:
        for var in (
            layer.data,
            layer.before_residual,
            layer.residual,
            layer.residual_end,
            layer.relu_end,
        ):
            if var is not None:
                out[var] = None
    return list(out)


def exponent(max_abs: float) -> int:
    """The smallest power-of-two scale exponent that fits ``max_abs`` in int8."""
    if not np.isfinite(max_abs):
        raise BoostError("calibration saw a non-finite value: check the calibration inputs")
    if max_abs <= 0:
        return -7
    return math.ceil(math.log2(max_abs / INT8_MAX))


def settle(layer: Layer, exps: dict[Any, int], cfg: VtaConfig) -> tuple[np.ndarray, np.ndarray]:
    """Fix the layer's extent and numbers; returns the int8 weights and the integer bias
    (``vta.lower`` checks that it fits the 32-bit accumulators)."""
    w_max = float(np.abs(layer.weight).max())
    e_w = exponent(w_max)
    e_x = exps[layer.data]
    e_acc = e_x + e_w
    residual_shift, pre_shift, end, relu = None, 0, layer.before_residual, False
    if layer.residual is not None:
        fused = _residual_shifts(exps[layer.residual] - e_acc, exps[_final(layer)] - e_acc)
        if fused is not None:
            (residual_shift, pre_shift), end = fused, layer.residual_end
    # Without a fused residual the add (and any ReLU after it) stays on the CPU.
    if layer.relu_end is not None and (layer.residual is None or residual_shift is not None):
        end, relu = layer.relu_end, True
    e_y = exps[end]
    shape = layer.attrs["shape"]
    kh, kw = layer.weight.shape[2:]
    if layer.dense:
        spec_args: dict[str, Any] = {"height": 1, "width": 1}
    else:
        spec_args = {
            "height": shape[2],
            "width": shape[3],
            "kernel": (kh, kw),
            "stride": layer.attrs["stride"],
            "padding": layer.attrs["padding"],
        }
    ceiling = INT8_MAX
    if relu and layer.relu_max is not None:
        ceiling = min(INT8_MAX, round(layer.relu_max / 2.0**e_y))
    layer.spec = ConvSpec(
        in_channels=layer.weight.shape[1],
        out_channels=layer.out_channels,
        shift=e_y - e_acc,
        clip=(0, ceiling) if relu else (-INT8_MAX, INT8_MAX),
        residual_shift=residual_shift,
        pre_shift=pre_shift,
        **spec_args,
    )
    layer.end = end
    layer.exponents = {"input": e_x, "weight": e_w, "output": e_y}
    if residual_shift is not None:
        layer.exponents["residual"] = exps[layer.residual]
    wq = np.clip(np.round(layer.weight / 2.0**e_w), -INT8_MAX, INT8_MAX).astype(np.int8)
    return wq, np.round(layer.bias / 2.0**e_acc).astype(np.int64)


def _final(layer: Layer) -> Any:
    """The last var the layer could reach: its ReLU, or else its residual add."""
    return layer.relu_end if layer.relu_end is not None else layer.residual_end


def _residual_shifts(k: int, total: int) -> tuple[int, int] | None:
    """(residual shift, pre-shift) that add a residual ``2**k`` accumulator units per step to a
    layer whose output is ``2**total`` units per step, or None when VTA cannot."""
    pre = max(0, k - 6)
    if pre and total - pre > 15:
        pre = total - 15
    if not 0 <= k - pre <= 6 or pre > 31:
        return None
    return k - pre, pre


def absorbed(layer: Layer) -> list[Any]:
    """The vars of the bindings the layer replaces, other than its end."""
    chain = [*layer.internal, layer.head]
    if layer.end is not layer.before_residual:
        chain.append(layer.before_residual)
    if layer.end is layer.relu_end:
        chain += [v for v in (layer.residual_end, layer.relu_inner) if v is not None]
    return [v for v in dict.fromkeys(chain) if v is not layer.end]


# -- calibration --------------------------------------------------------------------------------


def calibrate(
    mod: Any,
    variables: Sequence[Any],
    samples: Sequence[dict[str, np.ndarray]],
    target: dict[str, Any],
) -> dict[Any, float]:
    """max |v| of each variable over the samples, from the float module compiled for ``target``."""
    import tvm
    from tvm import relax

    func = mod["main"]
    bb = relax.BlockBuilder()
    with bb.function("main", list(func.params)):
        with bb.dataflow():
            for binding in func.body.blocks[0].bindings:
                bb.emit_normalized(binding)
            maxima = [bb.emit(relax.op.max(relax.op.abs(v))) for v in variables]
            out = bb.emit_output(relax.Tuple(maxima))
        bb.emit_func_output(out)
    # The same module with this main: the frontend's own TIR functions come along.
    module = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    module.update_func(module.get_global_var("main"), bb.get()["main"])
    executable = tvm.compile(module, tvm.target.Target(target))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    names = [str(p.name) for p in func.params]
    worst = np.zeros(len(variables))
    for sample in samples:
        result = vm["main"](*(tvm.runtime.tensor(sample[n]) for n in names))
        worst = np.maximum(worst, [float(r.numpy()) for r in result])
    return dict(zip(variables, worst.tolist(), strict=True))


# -- the rewrite --------------------------------------------------------------------------------


def _pack(bb: Any, x: Any, e: int, shape: tuple[int, ...], cfg: VtaConfig) -> Any:
    """float NCHW (or (1, K)) → int8 (C/B, H, W, B) at scale 2**e."""
    from tvm import relax

    op = relax.op
    c = shape[1]
    h, w = (shape[2], shape[3]) if len(shape) == 4 else (1, 1)
    scaled = op.multiply(x, relax.const(2.0**-e, "float32"))
    q = bb.emit(
        op.astype(
            op.clip(op.round(scaled), relax.prim_value(-INT8_MAX), relax.prim_value(INT8_MAX)),
            "int8",
        )
    )
    q = bb.emit(op.reshape(q, (c, h, w)))
    padded = blocks(c, cfg) * cfg.block
    if padded != c:
        q = bb.emit(op.nn.pad(q, [0, padded - c, 0, 0, 0, 0]))
    q = bb.emit(op.reshape(q, (padded // cfg.block, cfg.block, h, w)))
    return bb.emit(op.permute_dims(q, [0, 2, 3, 1]))


def _unpack(bb: Any, y: Any, e: int, shape: tuple[int, ...], cfg: VtaConfig) -> Any:
    """int8 (C/B, H, W, B) → float in ``shape`` (NCHW or (1, N)) at scale 2**e."""
    from tvm import relax

    op = relax.op
    c = shape[1]
    h, w = (shape[2], shape[3]) if len(shape) == 4 else (1, 1)
    padded = blocks(c, cfg) * cfg.block
    t = bb.emit(op.reshape(op.permute_dims(y, [0, 3, 1, 2]), (padded, h, w)))
    if padded != c:
        t = bb.emit(op.strided_slice(t, axes=[0], begin=[0], end=[c]))
    t = bb.emit(op.reshape(t, shape))
    return op.multiply(op.astype(t, "float32"), relax.const(2.0**e, "float32"))


def _rewrite(mod: Any, layers: Sequence[Layer], keys: Sequence[str], cfg: VtaConfig) -> Any:
    from tvm import relax

    by_end = {layer.end: (layer, key) for layer, key in zip(layers, keys, strict=True)}
    skipped = {v for layer in layers for v in absorbed(layer)}

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):  # type: ignore[misc]
        def __init__(self, module: Any) -> None:
            super().__init__(module)
            self.packed: dict[Any, Any] = {}

        def packed_input(self, var: Any, e: int) -> Any:
            if var in self.packed:
                return self.packed[var]
            shape = _shape(var)
            assert shape is not None
            value = _pack(self.builder_, self.visit_expr(var), e, shape, cfg)
            self.packed[var] = value
            return value

        def visit_var_binding_(self, binding: Any) -> None:
            var = binding.var
            if var in skipped:
                return
            if var not in by_end:
                super().visit_var_binding_(binding)
                return
            layer, key = by_end[var]
            spec = layer.spec
            assert spec is not None
            args = [relax.expr.String(key), self.packed_input(layer.data, layer.exponents["input"])]
            if spec.residual_shift is not None:
                args.append(self.packed_input(layer.residual, layer.exponents["residual"]))
            out_shape = (blocks(spec.out_channels, cfg), spec.out_height, spec.out_width, cfg.block)
            call = self.builder_.emit(
                relax.call_dps_packed(
                    PACKED_FUNCTION, args, out_ty=relax.TensorType(out_shape, "int8")
                )
            )
            self.packed[var] = call
            shape = _shape(var)
            assert shape is not None
            value = _unpack(self.builder_, call, layer.exponents["output"], shape, cfg)
            if isinstance(var, relax.DataflowVar):
                new = self.builder_.emit(value)
            else:
                new = self.builder_.emit_output(value)
            self.set_var_remap(var, new)

    rewriter = Rewriter(mod)
    gv = mod.get_global_var("main")
    rewriter.builder_.update_func(gv, rewriter.visit_expr(mod["main"]))
    return relax.transform.DeadCodeElimination()(rewriter.builder_.get())


# -- the whole step -------------------------------------------------------------------------


def partition(
    mod: Any,
    samples: Sequence[dict[str, np.ndarray]],
    host_target: dict[str, Any],
    cfg: VtaConfig,
    build_id: str,
) -> Partition:
    """Quantize, cut out and lower every layer VTA can run; the rest stays float for the CPU."""
    from tvm import relax

    mod = relax.transform.DeadCodeElimination()(mod)
    graph = _Graph(mod["main"])
    layers = find_layers(graph)
    if not layers:
        raise BoostError(
            "no layer of this model can run on VTA (int8 conv2d with groups=1 and dense layers "
            f"with >= {MIN_CHANNELS} input channels): build it for a CPU target instead"
        )
    ranges = calibrate(mod, boundary_vars(layers), samples, host_target)
    exps = {var: exponent(value) for var, value in ranges.items()}
    lowered: list[LoweredLayer] = []
    for layer in layers:
        wq, bq = settle(layer, exps, cfg)
        assert layer.spec is not None
        lowered.append(lower(layer.spec, wq, bq, cfg))
    bundle = Bundle(build_id, cfg, tuple(lowered))
    module = _rewrite(mod, layers, [bundle.key(i) for i in range(len(layers))], cfg)
    report = {
        "layers": [
            {
                "kind": "dense" if layer.dense else "conv2d",
                "spec": low.spec.to_dict(),
                "exponents": layer.exponents,
                "tiling": vars(low.tiling),
                **low.counts(),
            }
            for layer, low in zip(layers, lowered, strict=True)
        ],
    }
    return Partition(module, bundle, report)
