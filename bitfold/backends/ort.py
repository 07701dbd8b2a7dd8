"""ONNX Runtime backend.

``device="auto"`` uses the CUDA execution provider when this onnxruntime build has it, else the CPU. Sessions are
built by :func:`bitfold.runtime.session`, which keeps ORT computing what the graph says (no int8 activations for
fused ``DequantizeLinear → MatMul``, no quantized float weights, no fp8 QDQ fusions) and reads
``$BITFOLD_ORT_OPTIMIZATION`` for the default graph-optimization level.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from bitfold.backends import Timed
from bitfold.errors import BitfoldError
from bitfold.frontend.inputs import check_feeds
from bitfold.runtime import session

_DEVICES = ("auto", "cpu", "cuda")


class OrtRunnable(Timed):
    backend = "ort"

    def __init__(
        self,
        model: ir.Model,
        *,
        device: str = "auto",
        threads: int | None = None,
        spinning: bool | None = None,
        optimization: str | None = None,
        global_pool: bool = False,
        profile: str | None = None,
    ) -> None:
        if device not in _DEVICES:
            raise BitfoldError(f"unknown device '{device}' for ONNX Runtime; choose one of: {', '.join(_DEVICES)}.")
        available = ort.get_available_providers()
        has_cuda = "CUDAExecutionProvider" in available
        if device == "cuda" and not has_cuda:
            raise BitfoldError("device 'cuda' requested but this onnxruntime has no CUDA provider; use device 'cpu'.")
        self.device = "cuda" if (device == "cuda" or (device == "auto" and has_cuda)) else "cpu"
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device == "cuda" else ["CPUExecutionProvider"]
        self._model = model
        self.session = session(model, providers=providers, threads=threads, spinning=spinning, optimization=optimization,
                               global_pool=global_pool, profile=profile)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self._model, feeds)
        outputs = self.session.run(self.output_names, dict(feeds))
        return dict(zip(self.output_names, outputs, strict=True))

    def times(self, feeds: Mapping[str, np.ndarray], iters: int) -> list[float]:
        """Wall seconds of ``iters`` consecutive runs (feeds checked once, outside the timed loop)."""
        check_feeds(self._model, feeds)
        feeds = dict(feeds)
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            self.session.run(self.output_names, feeds)
            times.append(time.perf_counter() - start)
        return times
