"""TVM backend: ``bitfold.compile(model, backend="tvm", device="cpu" | "cuda")``.

A model is built per input signature (TVM's importer needs static shapes): the first ``run`` with new shapes
prepares a copy of the model (``lower.prepare``: shapes fixed, bitfold ops with constant weights routed to
bitfold's kernels, everything else inlined to standard ops and constant-folded), imports it with TVM's ONNX
importer plus bitfold's converters and compiles it (``adapter``); later runs with the same shapes reuse it.
``device="auto"`` is CUDA when TVM sees a GPU, else the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from bitfold.backends import Timed
from bitfold.errors import BitfoldError
from bitfold.frontend.inputs import check_feeds, input_specs

_DEVICES = ("auto", "cpu", "cuda")


class TvmRunnable(Timed):
    backend = "tvm"

    def __init__(self, model: ir.Model, *, device: str = "auto", shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
        import tvm

        from bitfold.kernels import build

        if device not in _DEVICES:
            raise BitfoldError(f"unknown device '{device}' for TVM; choose one of: {', '.join(_DEVICES)}.")
        if device == "cuda" and not tvm.cuda().exist:
            raise BitfoldError("device 'cuda' requested but TVM finds no CUDA GPU; use device 'cpu'.")
        self.device = "cuda" if (device == "cuda" or (device == "auto" and tvm.cuda().exist)) else "cpu"
        self.target = build.target(self.device)
        self._model = model
        self.input_names = [spec.name for spec in input_specs(model)]
        self.output_names = [value.name for value in model.graph.outputs]
        self._sessions: dict[tuple, object] = {}
        #: nodes routed to bitfold kernels in the last build
        self.kernel_nodes = 0
        if shapes is not None:
            specs = input_specs(model)
            self._session({spec.name: np.zeros(spec.concrete(shapes), spec.dtype) for spec in specs})

    def _session(self, feeds: Mapping[str, np.ndarray]):
        from bitfold.backends.tvm import adapter, lower

        key = tuple((name, feeds[name].shape, feeds[name].dtype.str) for name in self.input_names)
        if key not in self._sessions:
            prepared, self.kernel_nodes = lower.prepare(self._model, {name: feeds[name].shape for name in self.input_names}, self.device)
            _inline_external(prepared)  # TVM's importer reads the proto alone: no external data files
            mod = adapter.import_model(ir.to_proto(prepared), {name: feeds[name] for name in self.input_names}, self.target)
            self._sessions[key] = adapter.Session(adapter.compile_module(mod, self.target), self.device)
        return self._sessions[key]

    def session(self, feeds: Mapping[str, np.ndarray]):
        """The built module for these feeds' signature (built on first use), for callers that keep their tensors on
        the device between calls (``Session.call`` takes TVM tensors in ``input_names`` order)."""
        check_feeds(self._model, feeds)
        return self._session(feeds)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self._model, feeds)
        outputs = self._session(feeds).run([feeds[name] for name in self.input_names])
        return dict(zip(self.output_names, outputs, strict=True))

    def times(self, feeds: Mapping[str, np.ndarray], iters: int) -> list[float]:
        """Wall seconds of ``iters`` consecutive runs, inputs already on the device."""
        check_feeds(self._model, feeds)
        session = self._session(feeds)
        tensors = session.upload([feeds[name] for name in self.input_names])
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            session.call(tensors)
            session.device.sync()
            times.append(time.perf_counter() - start)
        return times


def _inline_external(model: ir.Model) -> None:
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value = ir.tensor(value.const_value.numpy(), name=value.name)
