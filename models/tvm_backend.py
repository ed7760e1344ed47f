"""TVM behind one door: every call into TVM's compiler goes through this module.

When TVM's API moves, this is the file that changes. The rest of ``models/`` deals in ONNX protos,
target dicts, paths and numpy arrays.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from agent.errors import BoostError

log = logging.getLogger(__name__)

RECORDS_FILE = "database_tuning_record.json"
WORKLOADS_FILE = "database_workload.json"
#: A tuning directory's records made on other CPUs: tuning times them here before it searches.
CANDIDATES_DIR = "candidates"


class CompileError(BoostError):
    """TVM could not import or compile the model."""


def _tvm() -> Any:
    import tvm

    return tvm


def version() -> str:
    return str(_tvm().__version__)


def host_cpu() -> str:
    return str(_tvm().get_global_func("target.llvm_get_system_cpu")())


def host_features() -> frozenset[str]:
    """The features the host CPU really has (CPUID), in LLVM's names."""
    features = _tvm().get_global_func("tvm.codegen.llvm.GetHostCPUFeatures")()
    return frozenset(name for name, enabled in features.items() if enabled)


def cpu_model_features(mcpu: str, relevant: frozenset[str]) -> frozenset[str]:
    """The features LLVM assumes for the CPU model ``mcpu``, restricted to ``relevant``."""
    return frozenset(cpu_features({"kind": "llvm", "mcpu": mcpu}, relevant))


def cpu_features(target: dict[str, Any], relevant: frozenset[str]) -> tuple[str, ...]:
    """The ISA features LLVM enables for ``target``, restricted to ``relevant``."""
    tvm = _tvm()
    # The map holds the features LLVM enables for this CPU (values are empty strings).
    features = tvm.get_global_func("target.llvm_get_cpu_features")(tvm.target.Target(target))
    return tuple(sorted(name for name in features if name in relevant))


def import_onnx(model: onnx.ModelProto, origin: str) -> Any:
    """Import an ONNX model into a Relax IRModule with its weights bound as constants."""
    tvm = _tvm()
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    try:
        return _importer()(None, "float32").from_onnx(model.graph, opset)
    except tvm.error.OpNotImplemented as err:
        raise CompileError(
            f"{origin}: {err}. Replace these operators before export (or open an issue naming "
            "them); nothing was written"
        ) from err


def _importer() -> Any:
    """TVM's ONNX importer, with Clip to constant bounds as Relax ``maximum``/``minimum``.

    TVM imports Clip as TE kernels, which ``ConvertLayout`` cannot see into: it wraps each in
    transposes back to NCHW and forth, and MobileNetV2 spent a third of its time (3.6 of 11 ms)
    in those. The Relax operators stay channels-last and fuse into the convolution before them.
    """
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    class Importer(onnx_frontend.ONNXGraphImporter):  # type: ignore[misc]
        def _convert_operator(
            self, op_name: str, inputs: Any, attrs: dict[str, Any], opset: int
        ) -> Any:
            bounds = _clip_bounds(inputs, attrs, opset) if op_name == "Clip" else None
            if bounds is None:
                return super()._convert_operator(op_name, inputs, attrs, opset)
            x = inputs[0]
            dtype = self.bb.normalize(x).ty.dtype
            for bound, op in zip(bounds, (relax.op.maximum, relax.op.minimum), strict=True):
                if bound is not None:
                    x = op(x, relax.const(bound, dtype))
            return self.bb.normalize(x)

    return Importer


def _clip_bounds(inputs: Any, attrs: dict[str, Any], opset: int) -> list[float | None] | None:
    """Clip's lower and upper bound (None: unbounded, as ONNX reads a NaN bound too), or None
    when a bound is computed at run time."""
    if opset < 11:
        bounds = [attrs.get("min"), attrs.get("max")]
    else:
        bounds = []
        for expr in (inputs[1], inputs[2]):
            if expr is not None and not isinstance(expr, _tvm().ir.Constant):
                return None
            bounds.append(None if expr is None else float(expr.value.numpy()))
    return [None if b is None or math.isnan(b) else float(b) for b in bounds]


#: Convolutions run channels-last: the channel axis, a multiple of 16 in most CNN layers, is
#: the one the tuned kernels vectorize, where NCHW leaves them the width (7 in a ResNet's last
#: stage). Measured with 64 trials on a 512-channel 7x7 layer: 198 GFLOPS against 60.
CONV_LAYOUT = {"relax.nn.conv2d": ["NHWC", "OHWI"]}
#: Winograd F(4x4, 3x3) for 3x3 stride-1 convolutions: 36 multiplications per 4x4 output tile,
#: a quarter of the direct convolution's. Measured at tuning time, 256 trials per Winograd
#: kernel: 56x56x64, 0.94 ms against the direct convolution's 1.45 (128 trials); 28x28x128,
#: 0.67 against 1.6; 14x14x256 (16 tiles, 9 MB of transformed weights), 0.75-0.81 against
#: 1.37-1.44 (192 trials or more), ResNet-18 as a whole 2-3% faster with it. The 7x7 stage (4
#: tiles, 49 of their 64 outputs used, 38 MB of transformed weights read per call) is left out
#: (reasoned, not measured) and streams its weights instead (``_streaming``).
WINOGRAD_TILE = 4
WINOGRAD_MIN_CHANNELS = 32
WINOGRAD_MIN_TILES = 16
#: Bounded tuning (``minutes``): candidates a kernel gets per round, and at most in all. Every
#: kernel gets its first round even when the time is up (an unscheduled kernel is far slower
#: than any tuned one); the task scheduler spends what time is left where it gains the most.
#: Generating a round costs about as much as measuring 32 candidates, whatever its size.
ROUND_TRIALS = 32
KERNEL_TRIALS = 64
#: Records made on other CPUs timed per kernel (the shipped records are one per CPU).
CANDIDATES_TOP = 4


def optimize(
    mod: Any,
    target: dict[str, Any],
    tuning_dir: Path | None,
    trials: int = 0,
    minutes: float = 0.0,
    on_trials: Callable[[int], None] | None = None,
) -> Any:
    """The CPU pipeline: inference simplification, channels-last convolutions, operator fusion,
    and MetaSchedule.

    Records in ``tuning_dir`` are applied. Before that, MetaSchedule tunes into it: ``trials``
    candidates over all kernels, or, with ``minutes``, the kernels that have no record yet, for
    at most that long. ``on_trials`` is called with the number of measured candidates.
    """
    tvm = _tvm()
    from tvm import relax

    tvm_target = tvm.target.Target(target)
    with tvm_target:
        mod = tvm.transform.Sequential(
            [
                # Batch norms after a convolution become its weights and a bias add; folded
                # to constants here, as ConvertLayout crashes on a weight that is not one.
                relax.transform.FoldBatchnormToConv2D(),
                relax.transform.FoldConstant(),
                relax.transform.DecomposeOpsForInference(),
                relax.transform.CanonicalizeBindings(),
                relax.transform.ConvertLayout(CONV_LAYOUT),
                # The weights' layout transposes, to constants: Winograd transforms constants.
                relax.transform.FoldConstant(),
                relax.transform.LegalizeOps(
                    {"relax.nn.conv2d": _legalize_conv2d, "relax.matmul": _legalize_matmul}
                ),
                relax.get_pipeline("zero"),
            ]
        )(mod)
        if tuning_dir is None:
            return mod
        tuning_dir.mkdir(parents=True, exist_ok=True)
        # Weight prepacking: the tuned kernels read the weights in the layout they chose, and
        # the layout transform of the (constant) weights is folded away at build time.
        mod = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
        if trials or minutes:
            stop = threading.Event()
            watcher = None
            if on_trials is not None:
                watcher = threading.Thread(
                    target=_watch_records,
                    args=(tuning_dir / RECORDS_FILE, on_trials, stop),
                    daemon=True,
                )
                watcher.start()
            try:
                _tune(mod, tvm_target, tuning_dir, trials, minutes)
            finally:
                stop.set()
                if watcher is not None:
                    watcher.join()
        return tvm.transform.Sequential(
            [
                relax.transform.MetaScheduleApplyDatabase(str(tuning_dir)),
                relax.transform.SplitLayoutRewritePreproc(),
                relax.transform.LiftTransformParams(),
                relax.transform.FoldConstant(),
                # Folding leaves each kernel's constant arguments packed in a tuple and unpacked
                # again at run time; these two drop those (MobileNetV2: 339 -> 182 VM builtin
                # calls per run).
                relax.transform.CanonicalizeBindings(),
                relax.transform.DeadCodeElimination(),
            ]
        )(mod)


def _legalize_conv2d(bb: Any, call: Any) -> Any:
    """A convolution as a TVM kernel: Winograd where it pays (``_winograd_eligible``),
    convolutions with more weights than outputs, depthwise and 1x1 convolutions with search
    spaces of their own, TVM's direct convolution elsewhere."""
    tvm = _tvm()
    data, weight = call.args
    bound = bb.lookup_binding(weight) if isinstance(weight, tvm.relax.Var) else None
    weight = weight if bound is None else bound
    padding = [int(p) for p in call.attrs.padding]
    if _winograd_eligible(call.attrs, data.ty.shape, weight, padding):
        return _winograd(bb, data, weight, padding)
    if _depthwise_eligible(call.attrs, data.ty, weight.ty):
        return _depthwise(bb, data, weight, call.attrs)
    if _streaming_eligible(call.attrs, data.ty, weight.ty, call.ty):
        return _streaming(bb, data, weight, call.attrs)
    if _pointwise_eligible(call.attrs, data.ty, weight.ty, padding):
        return _pointwise(bb, data, weight, call.attrs)
    return tvm.ir.Op.get("relax.nn.conv2d").get_attr("FLegalize")(bb, call)


def _legalize_matmul(bb: Any, call: Any) -> Any:
    """A product as a TVM kernel: one row by constant weights (a classifier's dense layer) as
    ``_gemv``, TVM's own elsewhere."""
    tvm = _tvm()
    data, weight = call.args
    if _gemv_eligible(data.ty, weight, call.ty):
        return _gemv(bb, data, weight)
    return tvm.ir.Op.get("relax.matmul").get_attr("FLegalize")(bb, call)


def _gemv_eligible(data: Any, weight: Any, out: Any) -> bool:
    """One row of ``data`` by a constant matrix of weights, in the data's type."""
    tvm = _tvm()
    return bool(
        isinstance(weight, tvm.ir.Constant)
        and data.shape is not None
        and len(data.shape) == len(weight.ty.shape) == 2
        and isinstance(data.shape[0], tvm.tirx.IntImm)
        and int(data.shape[0]) == 1
        and str(out.dtype) == str(data.dtype) == str(weight.ty.dtype)
    )


def _gemv(bb: Any, data: Any, weight: Any) -> Any:
    """One row by a matrix, scheduled by ``_schedule_gemv``.

    Its weights are read once a run, from memory (MobileNetV2's last 5 MB): the generic space
    kept 500 sums a thread in memory and read and wrote them again for each 5 weights of a
    column. In the model, 2 threads, builds interleaved in one process: 0.22 ms against the
    generic space's 0.28, 0.18 against 0.21."""
    from tvm import te

    (_, k), (_, n) = data.ty.shape, weight.ty.shape

    def gemv(data: Any, weight: Any) -> Any:
        rk = te.reduce_axis((0, int(k)), "k")
        return te.compute(
            (1, int(n)),
            lambda i, j: te.sum(data[i, rk] * weight[rk, j], axis=rk),
            name="gemv",
            attrs={"schedule_rule": GEMV_RULE},
        )

    return bb.call_te(
        gemv, data, weight, primfunc_name_hint="gemv", primfunc_attrs={"op_pattern": 4}
    )


def _winograd_eligible(attrs: Any, data_shape: Any, weight: Any, padding: list[int]) -> bool:
    """A channels-last 3x3 stride-1 convolution of a batch of one with constant weights, at
    least ``WINOGRAD_MIN_CHANNELS`` channels in and out and ``WINOGRAD_MIN_TILES`` tiles."""
    if not isinstance(weight, _tvm().ir.Constant):
        return False
    co, kh, kw, ci = (int(d) for d in weight.ty.shape)
    n, h, w, _ = (int(d) for d in data_shape)
    tiles_h, tiles_w = _winograd_tiles(h, w, padding)
    return bool(
        (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) == ("NHWC", "OHWI", "NHWC")
        and attrs.groups == 1
        and n == 1
        and [int(s) for s in attrs.strides] == [1, 1]
        and [int(d) for d in attrs.dilation] == [1, 1]
        and (kh, kw) == (3, 3)
        and min(ci, co) >= WINOGRAD_MIN_CHANNELS
        and tiles_h * tiles_w >= WINOGRAD_MIN_TILES
    )


def _winograd_tiles(h: int, w: int, padding: list[int]) -> tuple[int, int]:
    """Output tiles down and across a 3x3 stride-1 convolution of an h x w input."""
    top, left, bottom, right = padding
    return -(-(h + top + bottom - 2) // WINOGRAD_TILE), -(-(w + left + right - 2) // WINOGRAD_TILE)


def _winograd(bb: Any, data: Any, weight: Any, padding: list[int]) -> Any:
    """Winograd F(m x m, 3 x 3) in NHWC: each m x m output tile is computed from an
    (m + 2) x (m + 2) input tile with (m + 2)^2 batched matrix products over the channels,
    (m + 2)^2 / (9 m^2) of the direct convolution's multiplications.

    The weights' transform is a kernel of its own on a constant, which the pipeline folds
    at build time; the tiles' transforms carry MetaSchedule's Winograd schedule rules.
    """
    from tvm import te, topi
    from tvm.topi.nn.winograd_util import winograd_transform_matrices

    m, r = WINOGRAD_TILE, 3
    alpha = m + r - 1
    dtype = str(data.ty.dtype)
    a_mat, b_mat, g_mat = winograd_transform_matrices(m, r, dtype)
    n, h, w, ci = (int(d) for d in data.ty.shape)
    co = int(weight.ty.shape[0])
    top, left, bottom, right = padding
    out_h, out_w = h + top + bottom - r + 1, w + left + right - r + 1
    tiles_h, tiles_w = _winograd_tiles(h, w, padding)
    tiles = n * tiles_h * tiles_w

    def transform_weight(weight: Any) -> Any:
        kh, kw = te.reduce_axis((0, r), "r_kh"), te.reduce_axis((0, r), "r_kw")
        return te.compute(
            (alpha, alpha, co, ci),
            lambda e, v, o, i: te.sum(
                weight[o, kh, kw, i] * g_mat[e, kh] * g_mat[v, kw], axis=[kh, kw]
            ),
            name="kernel_pack",
        )

    def tile_transform(x: Any, matrix: Any, size: int, channels: int, name: str) -> Any:
        """Each tile of ``x`` multiplied by ``matrix`` on both sides (matrix^T x matrix): the
        input tiles' transform (``data_pack``) or the products' (``inverse``), scheduled by
        MetaSchedule's Winograd rule of that name."""
        ra, rb = te.reduce_axis((0, alpha), "r_a"), te.reduce_axis((0, alpha), "r_b")
        return te.compute(
            (size, size, tiles, channels),
            lambda i, j, p, c: te.sum(
                x[ra, rb, p, c] * matrix[ra, i] * matrix[rb, j], axis=[ra, rb]
            ),
            name=name,
            attrs={"schedule_rule": f"conv2d_nhwc_winograd_{name}"},
        )

    def conv(data: Any, kernel_pack: Any) -> Any:
        # Pad to whole tiles: the last tile's surplus outputs are computed and dropped.
        data_pad = topi.nn.pad(
            data,
            (0, top, left, 0),
            (0, (tiles_h - 1) * m + alpha - h - top, (tiles_w - 1) * m + alpha - w - left, 0),
            name="data_pad",
            attrs={"schedule_rule": "None"},
        )
        input_tile = te.compute(
            (alpha, alpha, tiles, ci),
            lambda e, v, p, c: data_pad[
                p // (tiles_h * tiles_w), (p // tiles_w) % tiles_h * m + e, p % tiles_w * m + v, c
            ],
            name="input_tile",
            attrs={"schedule_rule": "None"},
        )
        data_pack = tile_transform(input_tile, b_mat, alpha, ci, "data_pack")
        rc = te.reduce_axis((0, ci), "ci")
        bgemm = te.compute(
            (alpha, alpha, tiles, co),
            lambda e, v, p, o: te.sum(data_pack[e, v, p, rc] * kernel_pack[e, v, o, rc], axis=rc),
            name="bgemm",
            attrs={
                "layout_free_placeholders": [kernel_pack],
                "meta_schedule.write_cache_level": [2],
            },
        )
        inverse = tile_transform(bgemm, a_mat, m, co, "inverse")
        return te.compute(
            (n, out_h, out_w, co),
            lambda b, y, x, o: inverse[
                y % m, x % m, b * tiles_h * tiles_w + y // m * tiles_w + x // m, o
            ],
            name="conv2d_winograd",
        )

    kernel_pack = bb.emit(
        bb.call_te(transform_weight, weight, primfunc_name_hint="winograd_weight_transform")
    )
    # Out-elementwise fusable, as TVM's convolution: the bias, activation and residual add
    # after it fuse into its last loop nest.
    return bb.call_te(
        conv,
        data,
        kernel_pack,
        primfunc_name_hint="conv2d_winograd",
        primfunc_attrs={"op_pattern": 4},
    )


def _depthwise_eligible(attrs: Any, data: Any, weight: Any) -> bool:
    """A depthwise convolution (one filter per channel) for ``_depthwise``."""
    return bool(
        _channels_last_in_data_type(attrs, data)
        and int(attrs.groups) == int(data.shape[3]) == int(weight.shape[0])
        and int(weight.shape[3]) == 1
    )


def _pointwise_eligible(attrs: Any, data: Any, weight: Any, padding: list[int]) -> bool:
    """A 1x1 convolution without padding for ``_pointwise``."""
    return bool(
        _channels_last_in_data_type(attrs, data)
        and int(attrs.groups) == 1
        and (int(weight.shape[1]), int(weight.shape[2])) == (1, 1)
        and not any(padding)
    )


def _streaming_eligible(attrs: Any, data: Any, weight: Any, out: Any) -> bool:
    """A convolution with more weights than outputs, for ``_streaming`` (a 1x1 too)."""
    return bool(
        _channels_last_in_data_type(attrs, data)
        and int(attrs.groups) == 1
        and math.prod(int(d) for d in weight.shape) > math.prod(int(d) for d in out.shape)
    )


def _channels_last_in_data_type(attrs: Any, data: Any) -> bool:
    return bool(
        (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) == ("NHWC", "OHWI", "NHWC")
        and str(attrs.out_dtype or data.dtype) == str(data.dtype)
    )


#: The ``schedule_rule`` of the kernels ``_depthwise``, ``_pointwise``, ``_streaming`` and
#: ``_gemv`` make: MetaSchedule's generic search space keeps a tile's sums in memory, and
#: rarely vectorized a depthwise convolution (18-23 GFLOPS after 105 trials).
DEPTHWISE_RULE = "conv2d_nhwc_depthwise"
POINTWISE_RULE = "conv2d_nhwc_pointwise"
STREAMING_RULE = "conv2d_nhwc_streaming"
GEMV_RULE = "gemv_streaming"
#: The block of a ``_pointwise`` kernel with padded outputs that stores the real ones.
POINTWISE_STORE = "pointwise_channels"
#: The loop of a kernel's tiles in our search spaces, run in parallel by ``_tiles_per_core``.
TILES = "boost.tiles"
#: The revision of our search spaces, part of the tuning key. A record made in an earlier one
#: replays that one's schedule, and a shipped record carried over to the current spaces keeps
#: its time: MetaSchedule, which applies the fastest, could not tell them apart. Raise it with
#: a change that makes the earlier schedules slower, and carry the shipped records over.
SPACES = 1


def _depthwise(bb: Any, data: Any, weight: Any, attrs: Any) -> Any:
    """A depthwise convolution in NHWC, scheduled by ``_schedule_depthwise``."""
    from tvm import te

    def taps(pad: Any, weight: Any, at: Any, ch: Any, ry: Any, rx: Any) -> Any:
        return te.sum(pad[(*at, ch)] * weight[ch, ry, rx, 0], axis=[ry, rx])

    channels = int(data.ty.shape[3])
    return _sliding(bb, data, weight, attrs, "depthwise", DEPTHWISE_RULE, channels, taps)


def _pointwise(bb: Any, data: Any, weight: Any, attrs: Any) -> Any:
    """A 1x1 convolution in NHWC (a product of the pixels' channels and the weights),
    scheduled by ``_schedule_pointwise``.

    Where padding the outputs to whole vectors of the target takes fewer vectors (24 outputs
    in AVX-512's 16-float vectors: 2 rather than 3 of 8), constant weights get zero filters:
    the kernel sums the padded outputs in registers and stores the real ones
    (``POINTWISE_STORE``). MobileNetV2's 144->24 1x1 with its residual, in the model, builds
    interleaved in one process: 0.19 ms against 0.33 on 2 threads, 0.34 against 0.67 on one.
    """
    tvm = _tvm()
    from tvm import te

    n, h, w, c = (int(d) for d in data.ty.shape)
    sh, sw = (int(s) for s in attrs.strides)
    outputs = padded = int(weight.ty.shape[0])
    if isinstance(weight, tvm.ir.Constant):
        padded = _padded_outputs(outputs, weight.ty.dtype)
    if padded != outputs:
        zeros = [(0, padded - outputs), (0, 0), (0, 0), (0, 0)]
        weight = tvm.relax.const(np.pad(weight.value.numpy(), zeros))
    shape = (n, (h - 1) // sh + 1, (w - 1) // sw + 1)

    def conv(data: Any, weight: Any) -> Any:
        rc = te.reduce_axis((0, c), "rc")
        sums = te.compute(
            (*shape, padded),
            lambda b, y, x, f: te.sum(data[b, y * sh, x * sw, rc] * weight[f, 0, 0, rc], axis=rc),
            name="pointwise",
            attrs={"schedule_rule": POINTWISE_RULE},
        )
        if padded == outputs:
            return sums
        return te.compute((*shape, outputs), lambda *at: sums[at], name=POINTWISE_STORE)

    return bb.call_te(
        conv, data, weight, primfunc_name_hint="conv2d_pointwise", primfunc_attrs={"op_pattern": 4}
    )


def _padded_outputs(outputs: int, dtype: str) -> int:
    """``outputs`` padded to whole vectors of the current target where that takes fewer
    vectors than the widest vector dividing them, and at most 4 (a register tile's)."""
    tvm = _tvm()
    target = tvm.target.Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return outputs
    has = functools.partial(tvm.target.codegen.target_has_features, target=target)
    bits = 512 if has("avx512f") else 256 if has("avx") else 128
    lanes = max(1, bits // tvm.DataType(dtype).bits)
    padded = -(-outputs // lanes) * lanes
    dividing = math.gcd(outputs, lanes)
    return padded if padded // lanes < outputs // dividing and padded <= 4 * lanes else outputs


def _streaming(bb: Any, data: Any, weight: Any, attrs: Any) -> Any:
    """A convolution in NHWC, scheduled by ``_schedule_streaming``.

    In a model the weights are cold: ResNet-18's 46 MB cycle through the cache every run, while
    the tuner times a kernel again and again on the same, cached, weights. The generic space
    tiles by pixels and reads the weights again for each tile: its best record of a 512->512
    3x3 on 7x7 took 0.94 ms alone and 2.36 in the model; this space's, 0.71 and 1.11. ResNet-18
    on 2 threads: 13.3 ms against 16.2, builds timed in one process.
    """
    from tvm import te

    def taps(pad: Any, weight: Any, at: Any, f: Any, ry: Any, rx: Any) -> Any:
        rc = te.reduce_axis((0, int(data.ty.shape[3])), "rc")
        return te.sum(pad[(*at, rc)] * weight[f, ry, rx, rc], axis=[ry, rx, rc])

    channels = int(weight.ty.shape[0])
    return _sliding(bb, data, weight, attrs, "streaming", STREAMING_RULE, channels, taps)


def _sliding(
    bb: Any, data: Any, weight: Any, attrs: Any, kind: str, rule: str, channels: int, taps: Any
) -> Any:
    """A convolution in NHWC (kernel ``conv2d_{kind}``, scheduled by the search space of
    ``rule``) with ``channels`` outputs a pixel, the filter sliding over the padded input:
    ``taps(pad, weight, at, channel, ry, rx)`` sums an output over the filter's taps ``ry``,
    ``rx``, where ``at`` is the batch, row and column of its input at that tap."""
    from tvm import te, topi

    n, h, w, _ = (int(d) for d in data.ty.shape)
    _, kh, kw, _ = (int(d) for d in weight.ty.shape)
    top, left, bottom, right = (int(p) for p in attrs.padding)
    sh, sw = (int(s) for s in attrs.strides)
    dh, dw = (int(d) for d in attrs.dilation)
    out_h = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + left + right - dw * (kw - 1) - 1) // sw + 1

    def conv(data: Any, weight: Any) -> Any:
        pad = topi.nn.pad(
            data,
            (0, top, left, 0),
            (0, bottom, right, 0),
            name="pad",
            attrs={"schedule_rule": "None"},  # placed by the search space
        )
        ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
        return te.compute(
            (n, out_h, out_w, channels),
            lambda b, y, x, c: taps(
                pad, weight, (b, y * sh + ry * dh, x * sw + rx * dw), c, ry, rx
            ),
            name=kind,
            attrs={"schedule_rule": rule},
        )

    return bb.call_te(
        conv, data, weight, primfunc_name_hint=f"conv2d_{kind}", primfunc_attrs={"op_pattern": 4}
    )


def _schedule_streaming(sch: Any, block: Any) -> list[Any]:
    """MetaSchedule's search spaces for ``_streaming``: each thread takes whole blocks of output
    channels, so each weight is read from memory once, and computes them a tile of rows x
    columns x vectors of channels at a time, summed in registers; the padding copied first,
    or (the second space) tested at each tap."""
    b, y, x, f, ry, rx, rc = sch.get_loops(block)
    (y_o, y_i), (x_o, x_i), (f_o, f_i, f_v) = _tile_splits(sch, y, x, f)
    rc_o, rc_i = sch.split(rc, sch.sample_perfect_tile(rc, n=2, max_innermost_factor=64))
    sch.reorder(b, f_o, y_o, x_o, rc_o, ry, rx, rc_i, y_i, x_i, f_i, f_v)
    _register_tile(sch, block, [b, f_o, y_o, x_o], [y_i, x_i, f_i, f_v])
    (pad,) = sch.get_producers(block)
    unpadded = sch.copy()
    unpadded.compute_inline(pad)
    pb, py, _, pc = sch.get_loops(pad)
    sch.parallel(sch.fuse(pb, py))
    sch.vectorize(sch.split(pc, [None, _lanes(sch, pc)])[1])
    return [sch, unpadded]


def _schedule_gemv(sch: Any, block: Any) -> list[Any]:
    """MetaSchedule's search space for ``_gemv``: each thread takes whole blocks of columns and
    sums them in registers, vectors of columns at a time, over the rows of weights, which it
    reads once, in the order it stores them (prepacked)."""
    i, j, k = sch.get_loops(block)
    j_o, j_v = sch.split(j, [None, _lanes(sch, j)])
    j_o, j_i = sch.split(j_o, sch.sample_perfect_tile(j_o, n=2, max_innermost_factor=8))
    k_o, k_i = sch.split(k, sch.sample_perfect_tile(k, n=2, max_innermost_factor=16))
    sch.reorder(i, j_o, k_o, k_i, j_i, j_v)
    _register_tile(sch, block, [i, j_o], [k_i, j_i, j_v])
    return [sch]


def _schedule_depthwise(sch: Any, block: Any) -> list[Any]:
    """MetaSchedule's search spaces for ``_depthwise``: a tile of rows x columns x a vector of
    channels (its sizes sampled) summed in registers across the filter's taps, tiles in
    parallel; the tile's padded input window copied first, or (the second space) the padding
    tested at each tap, which saves the copy."""
    b, y, x, c, ry, rx = sch.get_loops(block)
    c_o, c_i = sch.split(c, [None, _lanes(sch, c)])
    y_o, y_i = sch.split(y, sch.sample_perfect_tile(y, n=2, max_innermost_factor=4))
    x_o, x_i = sch.split(x, sch.sample_perfect_tile(x, n=2, max_innermost_factor=8))
    sch.reorder(b, y_o, x_o, c_o, y_i, ry, rx, x_i, c_i)
    tile = sch.fuse(b, y_o, x_o, c_o)
    sch.annotate(tile, TILES, 1)
    unroll = sch.sample_categorical([0, 16, 64, 512], [0.25] * 4)
    sch.annotate(tile, "pragma_auto_unroll_max_step", unroll)
    sch.annotate(tile, "pragma_unroll_explicit", 1)
    _store_tile(sch, block, tile)
    sch.unroll(x_i)
    sch.vectorize(c_i)
    (pad,) = sch.get_producers(block)
    unpadded = sch.copy()
    unpadded.compute_inline(pad)
    sch.compute_at(pad, tile, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(pad)[-1])
    return [sch, unpadded]


def _schedule_pointwise(sch: Any, block: Any) -> list[Any]:
    """MetaSchedule's search space for ``_pointwise``: a tile of rows x columns x vectors of
    output channels (its sizes sampled) summed in registers over the input channels, tiles in
    parallel; with outputs padded, a tile takes all of a pixel's."""
    b, y, x, f, rc = sch.get_loops(block)
    padded = _stored_by(sch, block) is not None
    (y_o, y_i), (x_o, x_i), (f_o, f_i, f_v) = _tile_splits(sch, y, x, f, whole_channels=padded)
    sch.reorder(b, y_o, x_o, f_o, rc, y_i, x_i, f_i, f_v)
    _register_tile(sch, block, [b, y_o, x_o, f_o], [y_i, x_i, f_i, f_v])
    return [sch]


def _tile_splits(
    sch: Any, y: Any, x: Any, f: Any, whole_channels: bool = False
) -> tuple[Any, Any, Any]:
    """Rows ``y``, columns ``x`` and output channels ``f`` split into tiles (sizes sampled) of
    rows x columns x vectors of channels (all of them with ``whole_channels``): (outer, inner)
    rows and columns, and (outer, vectors, lanes) channels."""
    f_o, f_v = sch.split(f, [None, _lanes(sch, f)])
    vectors = (
        [1, None] if whole_channels else sch.sample_perfect_tile(f_o, n=2, max_innermost_factor=4)
    )
    f_o, f_i = sch.split(f_o, vectors)
    y_o, y_i = sch.split(y, sch.sample_perfect_tile(y, n=2, max_innermost_factor=4))
    x_o, x_i = sch.split(x, sch.sample_perfect_tile(x, n=2, max_innermost_factor=16))
    return (y_o, y_i), (x_o, x_i), (f_o, f_i, f_v)


def _register_tile(sch: Any, block: Any, tiles: list[Any], tile: list[Any]) -> None:
    """``block``'s loops ``tiles`` fused and run in parallel (``TILES``), each computing a tile
    whose loops ``tile`` (rows, columns, vectors, lanes) are unrolled and its lanes vectorized,
    its sums in registers (``_store_tile``)."""
    fused = sch.fuse(*tiles)
    sch.annotate(fused, TILES, 1)
    _store_tile(sch, block, fused)
    for loop in tile[:-1]:
        sch.unroll(loop)
    sch.vectorize(tile[-1])


def _lanes(sch: Any, channels: Any) -> int:
    """The widest vector (at most AVX-512's 16 floats) that divides the ``channels`` loop."""
    extent = int(sch.get(channels).extent)
    return next(v for v in (16, 8, 4, 2, 1) if extent % v == 0)


def _store_tile(sch: Any, block: Any, tile: Any) -> None:
    """``block``'s sums kept in a buffer of the ``tile``'s size while the tile of its output is
    computed, then stored in vectors with the epilogue (the bias, activation and residual: one
    elementwise block after another) applied on the way; padded sums (``_pointwise``) by the
    block that stores the real ones.

    The buffer is the kernel's own memory ("global"), which TVM puts on the stack under 1 KB,
    where LLVM keeps it in registers; TVM takes a "local" buffer from its workspace pool, a
    call pair for every tile. MobileNetV2's kernels in the model, builds interleaved in one
    process, 2 threads: 5.02 ms against 5.31 and 4.45 against 4.69 (1 thread: 9.32 against
    9.80, 9.29 against 9.64).
    """
    stored = _stored_by(sch, block)
    if stored is None:
        stored = sch.cache_write(block, 0, "global")
    consumers = sch.get_consumers(stored)
    while len(consumers) == 1:
        sch.reverse_compute_inline(consumers[0])
        consumers = sch.get_consumers(stored)
    sch.reverse_compute_at(stored, tile, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(stored)[-1])


def _stored_by(sch: Any, block: Any) -> Any:
    """The block that stores the real outputs of ``block``'s padded sums, or None."""
    consumers = sch.get_consumers(block)
    if [sch.get(c).name_hint for c in consumers] == [POINTWISE_STORE]:
        return consumers[0]
    return None


def _run_per_core(sch: Any, tiles: Any, cores: int) -> None:
    """The loop of a kernel's ``tiles`` run in parallel, split in one run of tiles per core
    where the cores divide them.

    A tile's buffers over 1 KB (its sums, a depthwise tile's padded input) come from TVM's
    workspace pool where the parallel loop's body starts: a call pair per tile with a tile an
    iteration, per core with a run of tiles. MobileNetV2 on 1 thread spent 5.5% of its time
    in the pool's calls (``perf``). Where the cores do not divide the tiles, a split would
    test every tile, and pad the layout of the weights prepacked for the kernel; those keep a
    tile an iteration. The loop's other annotations (the depthwise unrolling) go to the
    parallel loop."""
    loop = sch.get(tiles)
    annotations = {k: v for k, v in loop.annotations.items() if k != TILES}
    sch.unannotate(tiles, TILES)
    for key in annotations:  # a split takes a loop without them
        sch.unannotate(tiles, key)
    extent = int(loop.extent)
    if extent > cores and extent % cores == 0:
        tiles, _ = sch.split(tiles, [cores, None])
    sch.parallel(tiles)
    for key, value in annotations.items():
        sch.annotate(tiles, key, value)


def _tiles_per_core() -> Any:
    """MetaSchedule's postprocessing of our search spaces' schedules: each ``TILES`` loop run
    by ``_run_per_core`` on the target's cores. A postprocessing step sees the tile sizes the
    tuner chose (its mutations change them), and its steps are kept in the record."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.postproc import PyPostproc

    @derived_object
    class TilesPerCore(PyPostproc):  # type: ignore[misc]
        def _initialize_with_tune_context(self, context: Any) -> None:
            self.cores = int(context.target.attrs["num-cores"])

        def apply(self, sch: Any) -> bool:
            while (tiles := _next_tiles(sch)) is not None:
                _run_per_core(sch, tiles, self.cores)
            return True

        def clone(self) -> Any:
            return _tiles_per_core()

    return TilesPerCore()


def _next_tiles(sch: Any) -> Any:
    """A ``TILES`` loop of the schedule's function, or None."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        for loop in sch.get_loops(block):
            if TILES in sch.get(loop).annotations:
                return loop
    return None


def _space(mod: Any, target: Any) -> Any:
    """MetaSchedule's search space for a kernel ``mod`` on ``target``: the target's defaults,
    with our search spaces' loops of tiles run on its cores (``_tiles_per_core``) right after
    MetaSchedule's step that makes its own loops parallel: that step would fuse our runs of
    tiles back into one loop, and once the next one splits a reduction's initialization off,
    its loop can no longer be made parallel."""
    from tvm.s_tir import meta_schedule as ms

    default = ms.TuneContext(mod=mod, target=target, space_generator="post-order-apply")
    default = default.space_generator
    postprocs = []
    for postproc in default.postprocs:
        postprocs.append(postproc)
        if isinstance(postproc, ms.postproc.RewriteParallelVectorizeUnroll):
            postprocs.append(_tiles_per_core())
    return ms.space_generator.PostOrderApply(
        sch_rules=list(default.sch_rules),
        postprocs=postprocs,
        mutator_probs=dict(default.mutator_probs),
    )


def register_schedule_rules() -> None:
    """MetaSchedule's search spaces for the kernels ``_legalize_conv2d`` and
    ``_legalize_matmul`` make; the tuner looks them up by their blocks' ``schedule_rule``."""
    for rule, schedule in (
        (DEPTHWISE_RULE, _schedule_depthwise),
        (POINTWISE_RULE, _schedule_pointwise),
        (STREAMING_RULE, _schedule_streaming),
        (GEMV_RULE, _schedule_gemv),
    ):
        _tvm().register_global_func(f"s_tir.meta_schedule.cpu.{rule}", schedule, override=True)


def _tune(mod: Any, target: Any, tuning_dir: Path, trials: int, minutes: float) -> None:
    from tvm.s_tir import meta_schedule as ms

    register_schedule_rules()
    tasks = ms.relax_integration.extract_tasks(mod, target)
    callbacks = list(ms.MeasureCallback.create("default"))
    database = ms.database.JSONDatabase(work_dir=str(tuning_dir))
    runner = _runner(target)
    if (tuning_dir / CANDIDATES_DIR).is_dir():
        _time_candidates(tasks, target, database, runner, tuning_dir / CANDIDATES_DIR)
    if not trials:
        tasks = [
            task
            for task in tasks
            if database.query_tuning_record(task.dispatched[0], target, "main") is None
        ]
    if not tasks:
        return
    if trials:
        # One round for every kernel first (a kernel left without a record stays unscheduled),
        # then the rest of the trials where the task scheduler expects the most gain.
        per_task, per_round = trials, max(1, min(64, trials // len(tasks)))
    else:
        per_task, per_round = KERNEL_TRIALS, ROUND_TRIALS
        trials = per_task * len(tasks)
        callbacks.append(_deadline(time.monotonic() + 60 * minutes))
    log.info("tuning %d kernels: %d trials at most", len(tasks), trials)
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        tasks, work_dir=str(tuning_dir), space=_space(tasks[0].dispatched[0], target)
    )
    ms.tune_tasks(
        tasks=contexts,
        task_weights=weights,
        work_dir=str(tuning_dir),
        max_trials_global=trials,
        max_trials_per_task=per_task,
        num_trials_per_iter=per_round,
        builder=_builder(),
        runner=runner,
        measure_callbacks=callbacks,
    )


def _time_candidates(
    tasks: list[Any], target: Any, database: Any, runner: Any, candidates_dir: Path
) -> None:
    """The candidates' records of the kernels that have none in ``database`` (records made on
    other CPUs), built and timed on this machine as tuning times its candidates (``runner``);
    each that runs becomes a record in ``database`` with the time it took here. Then the search
    starts from schedules that were good elsewhere, and a bounded tuning has nothing left to do
    for the kernels they cover."""
    from tvm.s_tir import meta_schedule as ms

    candidates = ms.database.JSONDatabase(work_dir=str(candidates_dir))
    chosen = []
    for task in tasks:
        mod = task.dispatched[0]
        if database.query_tuning_record(mod, target, "main") is not None:
            continue
        if candidates.has_workload(mod):
            for record in candidates.get_top_k(candidates.commit_workload(mod), CANDIDATES_TOP):
                chosen.append((mod, record.as_measure_candidate()))
    if not chosen:
        return
    log.info("timing %d records made on other CPUs", len(chosen))
    built = _builder().build([ms.builder.BuilderInput(c.sch.mod, target) for _, c in chosen])
    runnable = [
        (mod, candidate, result.artifact_path)
        for (mod, candidate), result in zip(chosen, built, strict=True)
        if result.error_msg is None
    ]
    inputs = [ms.runner.RunnerInput(path, "cpu", c.args_info) for _, c, path in runnable]
    timed = [future.result() for future in runner.run(inputs)]
    for (mod, candidate, path), result in zip(runnable, timed, strict=True):
        shutil.rmtree(Path(path).parent)  # the builder's temporary directory
        if result.error_msg is None:
            workload = database.commit_workload(mod)
            run_secs = [float(t) for t in result.run_secs]
            database.commit_tuning_record(
                ms.database.TuningRecord(
                    candidate.sch.trace, workload, run_secs, target, candidate.args_info
                )
            )
    log.info("%d of them ran here", sum(r.error_msg is None for r in timed))


def _deadline(at: float) -> Any:
    """A measure callback that ends every task once ``time.monotonic()`` passes ``at``."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class Deadline(PyMeasureCallback):  # type: ignore[misc]
        def apply(self, task_scheduler: Any, *_: Any) -> None:
            if time.monotonic() > at:
                for task_id, task in enumerate(task_scheduler.tasks_):
                    if not task.is_terminated:
                        task_scheduler.terminate_task(task_id)

    return Deadline()


def _builder() -> Any:
    """MetaSchedule's builder, in this process, a thread per core.

    TVM's LocalBuilder starts new worker processes for every batch of candidates, and each one
    imports ``tvm.s_tir.tensor_intrin``, which takes about 19 s on this class of machine: more
    than building the batch, and past its 30 s timeout as soon as the machine is busy. Building
    here pays that import once (tuning itself needs it); TVM's calls release the GIL, so the
    threads compile in parallel. A candidate that fails to build is a build error, as in a
    worker.
    """
    tvm = _tvm()
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_export
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    # What the workers' build does, without its call of the deprecated ``tvm.driver.build``.
    strip_layout_rewrite = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)

    @derived_object
    class InProcessBuilder(PyBuilder):  # type: ignore[misc]
        def build(self, build_inputs: list[Any]) -> list[Any]:
            with ThreadPoolExecutor(os.cpu_count()) as pool:
                return list(pool.map(build_one, build_inputs))

    def build_one(candidate: Any) -> Any:
        try:
            library = tvm.tirx.build(strip_layout_rewrite(candidate.mod), candidate.target)
            return BuilderResult(default_export(library), None)
        except Exception as err:  # reported to the tuner as a build error
            return BuilderResult(None, f"{type(err).__name__}: {err}")

    return InProcessBuilder()


def _runner(target: Any) -> Any:
    """MetaSchedule's runner, timing candidates on the target's cores.

    TVM's thread pool takes half the CPUs of an x86 machine unless told (one of this project's
    2 cores), so the runner timed every candidate of a 2-core target on one thread: records
    chosen for the wrong machine. In MobileNetV2 a 16->96 1x1 kernel ran in 0.44 ms on 2
    threads against 0.78 on one."""
    from tvm.s_tir import meta_schedule as ms

    threads = int(target.attrs["num-cores"])
    return ms.runner.LocalRunner(initializer=functools.partial(_use_threads, threads))


def _use_threads(threads: int) -> None:
    """The runner's worker process: TVM's thread pool, created later, takes ``threads``."""
    os.environ["TVM_NUM_THREADS"] = str(threads)


def _watch_records(path: Path, on_trials: Callable[[int], None], stop: threading.Event) -> None:
    start = _count_lines(path)
    while not stop.wait(1.0):
        on_trials(_count_lines(path) - start)
    on_trials(_count_lines(path) - start)


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def workload_hashes(mod: Any, target: dict[str, Any]) -> set[str]:
    """The structural hashes by which MetaSchedule finds the records of the kernels that
    ``optimize`` makes of ``mod``."""
    tvm = _tvm()
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    tvm_target = tvm.target.Target(target)
    with tvm_target:
        mod = relax.transform.AttachAttrLayoutFreeBuffers()(optimize(mod, target, None))
    tasks = ms.relax_integration.extract_tasks(mod, tvm_target)
    return {str(ms.database.Workload(task.dispatched[0]).as_json()[0]) for task in tasks}


def untuned_kernels(mod: Any) -> list[str]:
    """The kernels of an optimized module that no tuning record scheduled: they run TVM's
    default schedule, several times slower than a tuned one."""
    tvm = _tvm()
    return sorted(
        gv.name_hint
        for gv, func in mod.functions_items()
        if isinstance(func, tvm.tirx.PrimFunc) and "tirx.is_scheduled" not in (func.attrs or {})
    )


def build(mod: Any, target: dict[str, Any]) -> Any:
    """Lower the optimised module to a Relax VM executable."""
    tvm = _tvm()
    try:
        return tvm.compile(mod, tvm.target.Target(target))
    except tvm.error.TVMError as err:
        raise CompileError(f"TVM failed to compile for {target}: {err}") from err


def export(executable: Any, path: Path, compiler: str) -> None:
    """Export the executable as a shared library linked by ``compiler``."""
    from tvm.support import cc

    executable.export_library(str(path), fcompile=cc.cross_compiler(compiler))
