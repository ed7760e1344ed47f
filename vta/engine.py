"""The device side of compiled VTA layers: upload, run, and the packed function TVM calls.

A model compiled ``--target vta`` calls ``boost.vta.layer(key, x[, residual], out)`` for every
layer the accelerator runs (``relax.call_dps_packed`` in the build). ``VtaEngine`` owns the
driver and the layers of every loaded model, keyed by the model's build id and the layer's
index; ``register`` makes it the process's handler of that function. One engine talks to one
device, so calls are serialised.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from vta import isa
from vta.bundle import Bundle
from vta.drivers.base import DeviceBuffer, Driver
from vta.errors import VtaError
from vta.lower import REGION_ALIGN, LoweredLayer, relocate
from vta.runtime import CommandQueue, UopKernel
from vta.sim import unpack_lanes

PACKED_FUNCTION = "boost.vta.layer"
#: Arenas start on a page so that every element size divides their address.
ARENA_ALIGN = 4096
assert ARENA_ALIGN % REGION_ALIGN == 0
RUN_TIMEOUT_S = 30.0
SMOKE_TIMEOUT_S = 5.0


def smoke_test(driver: Driver) -> None:
    """Check that the device computes: zero an accumulator tile, add 1 to it, store it, and read
    back 1 in every lane. Raises ``VtaError`` when the device fails, hangs or answers wrongly."""
    cfg = driver.config
    queue = CommandQueue(driver)
    out_bytes = cfg.elem_bytes(isa.MemId.OUT)
    out = queue.alloc(out_bytes, isa.MemId.OUT)
    try:
        kernel = UopKernel((isa.Uop(0, 0, 0),))
        queue.gemm(kernel, reset=True)
        queue.alu(kernel, isa.AluOp.ADD, imm=1)
        queue.dep_push(isa.Stage.COMPUTE, isa.Stage.STORE)
        queue.dep_pop(isa.Stage.COMPUTE, isa.Stage.STORE)
        queue.store_2d(out, 0, x_size=1, y_size=1, x_stride=1, sram_base=0)
        queue.synchronize(SMOKE_TIMEOUT_S)
        raw = np.frombuffer(driver.copy_out(out, out_bytes), np.uint8)
    finally:
        driver.free(out)
    lanes = unpack_lanes(raw.reshape(1, -1), cfg.out_width, cfg.batch * cfg.block)
    if not (lanes == 1).all():
        raise VtaError(
            f"the {cfg.bitstream_id} device computed {lanes.tolist()} for 0 + 1 in every lane: "
            "the design is not the one it claims to be, or it is broken"
        )


class LayerRunner:
    """One lowered layer resident on a device: constants uploaded, program relocated."""

    def __init__(self, driver: Driver, layer: LoweredLayer) -> None:
        self.driver, self.layer = driver, layer
        self.arena: DeviceBuffer | None = driver.alloc(layer.arena_bytes, ARENA_ALIGN)
        self.program: DeviceBuffer | None = None
        try:
            driver.copy_in(self.arena, layer.image, layer.constants.offset)
            stream = isa.encode_program(
                relocate(layer.insns, self.arena.addr, driver.config), driver.config
            )
            self.program = driver.alloc(len(stream), isa.INSN_BYTES)
            driver.copy_in(self.program, stream)
        except BaseException:
            self.close()
            raise

    def run(self, inputs: Sequence[np.ndarray], out: np.ndarray) -> None:
        """``inputs`` (the activation, then the residual if the layer has one) in packed layout."""
        layer, driver, arena = self.layer, self.driver, self.arena
        if arena is None or self.program is None:
            raise VtaError("the layer was unloaded from the device")
        regions = [layer.input] + ([layer.residual] if layer.residual is not None else [])
        if len(inputs) != len(regions):
            raise VtaError(f"the layer takes {len(regions)} inputs, got {len(inputs)}")
        for region, value in zip(regions, inputs, strict=True):
            if value.nbytes != region.nbytes:
                raise VtaError(f"an input of {value.nbytes} bytes, the layer reads {region.nbytes}")
            driver.copy_in(arena, value, region.offset)
        if out.nbytes != layer.output.nbytes:
            raise VtaError(
                f"an output of {out.nbytes} bytes, the layer writes {layer.output.nbytes}"
            )
        driver.run(self.program, len(layer.insns), RUN_TIMEOUT_S)
        raw = driver.copy_out(arena, layer.output.nbytes, layer.output.offset)
        out.reshape(-1).view(np.uint8)[...] = np.frombuffer(raw, np.uint8)

    def close(self) -> None:
        for buffer in (self.program, self.arena):
            if buffer is not None:
                self.driver.free(buffer)
        self.program = self.arena = None


class VtaEngine:
    """The layers of every loaded model on one device, and the calls into them."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self._lock = threading.Lock()
        self._models: dict[str, list[LayerRunner]] = {}

    @property
    def design(self) -> str:
        return self.driver.config.bitstream_id

    def add(self, bundle: Bundle) -> None:
        """Upload every layer of a model (again, if its build was loaded before)."""
        if bundle.design != self.design:
            raise VtaError(
                f"the model was compiled for VTA design {bundle.design}; this device runs "
                f"{self.design}: rebuild it for this design"
            )
        with self._lock:
            self._drop(bundle.build_id)
            runners: list[LayerRunner] = []
            try:
                for layer in bundle.layers:
                    runners.append(LayerRunner(self.driver, layer))
            except BaseException:
                for runner in runners:
                    runner.close()
                raise
            self._models[bundle.build_id] = runners

    def __contains__(self, build_id: object) -> bool:
        """Whether a model's layers are on the device."""
        with self._lock:
            return build_id in self._models

    def remove(self, build_id: str) -> None:
        with self._lock:
            self._drop(build_id)

    def _drop(self, build_id: str) -> None:
        for runner in self._models.pop(build_id, []):
            runner.close()

    def call(self, key: str, *tensors: Any) -> None:
        """The packed function: ``key`` is ``build_id/index``; the last tensor is the output."""
        build_id, _, index = str(key).rpartition("/")
        with self._lock:
            runners = self._models.get(build_id)
            if runners is None or not index.isdigit() or int(index) >= len(runners):
                raise VtaError(f"no VTA layer {key!r} is loaded on this device")
            arrays = [np.from_dlpack(t) for t in tensors]
            runners[int(index)].run(arrays[:-1], arrays[-1])

    def close(self) -> None:
        with self._lock:
            for build_id in list(self._models):
                self._drop(build_id)
            self.driver.close()


def register(engine: VtaEngine) -> None:
    """Make ``engine`` the handler of ``boost.vta.layer`` in this process."""
    import tvm_ffi

    tvm_ffi.register_global_func(PACKED_FUNCTION, engine.call, override=True)
