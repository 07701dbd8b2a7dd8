"""Everything that touches apache-tvm's Relax API (pinned to 0.27.x; the API changes between releases).

- ``import_model``: ``tvm.relax.frontend.onnx.from_onnx`` with bitfold's converters added to the importer's
  converter table for the duration of the call (the importer has no public registration hook). A converter
  reshapes the activations to [M, K], emits the kernel's scheduled PrimFunc (``bitfold.kernels.build``) through
  ``call_tir`` and reshapes the result back.
- ``compile_module``: the Relax pipeline for the target. CUDA uses TVM's default pipeline (dlight GPU rules);
  llvm first rewrites exp, softmax, erf, tanh (TVM's ``FastMathTransform``) and sigmoid (``FastSigmoid``) to TVM's
  polynomial approximations (libm's expf is a scalar call per element, and SmolLM2's SiLU and attention softmax
  took 30 of a 128-token forward's 240 ms; the polynomials vectorize, 11.5 ms, within 5e-6 relative), and adds
  ``schedule.ScheduleStandardOps`` after operator fusion, because the default CPU pipeline schedules nothing.
- ``VirtualMachine`` execution with numpy in and out.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping

import numpy as np
import onnx
import tvm
from tvm import relax, topi
from tvm.relax.frontend.onnx import onnx_frontend

from bitfold.backends.tvm.schedule import ScheduleStandardOps
from bitfold.errors import BitfoldError
from bitfold.kernels import KERNELS, Kernel, _load, build


def _converter(entry: Kernel, device_target: tvm.target.Target) -> type:
    def convert(cls, bb, inputs, attrs, params):
        x, *weights = inputs
        shape = [int(d) for d in x.ty.shape]
        m, k = int(np.prod(shape[:-1])), shape[-1]
        ints = {name: int(value) for name, value in attrs.items() if isinstance(value, (int, np.integer))}
        arrays = [None if w is None else w.value.numpy() for w in weights]
        try:
            prepared = entry.prepare([None, *arrays], ints)
        except ValueError as e:
            raise BitfoldError(f"{entry.op_type} node '{attrs['tvm_custom']['name']}' cannot be lowered to a TVM kernel: {e}.") from e
        func = build.prim_func(entry, prepared, m, device_target)
        gv = bb.add_func(func, f"bitfold_{entry.op_type}")
        flat = bb.normalize(relax.op.reshape(x, (m, k)))
        operands = [relax.const(a) for a in prepared.arrays]
        y = bb.emit(relax.call_tir(gv, [flat, *operands], relax.TensorType((m, prepared.n), "float32")))
        return bb.normalize(relax.op.reshape(y, (*shape[:-1], prepared.n)))

    return type(f"Bitfold{entry.op_type}", (onnx_frontend.OnnxOpConverter,), {"_impl_v1": classmethod(convert)})


@contextlib.contextmanager
def _converters(device_target: tvm.target.Target) -> Iterator[None]:
    _load()
    extra = {key: _converter(entry, device_target) for key, entry in KERNELS.items()}
    original = onnx_frontend._get_convert_map
    onnx_frontend._get_convert_map = lambda: {**original(), **extra}
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original


def import_model(proto: onnx.ModelProto, feeds: Mapping[str, np.ndarray], device_target: tvm.target.Target) -> tvm.IRModule:
    shapes = {name: list(array.shape) for name, array in feeds.items()}
    dtypes = {name: str(array.dtype) for name, array in feeds.items()}
    with _converters(device_target), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the importer runs onnx.checker, which knows no bitfold ops
        try:
            return onnx_frontend.from_onnx(proto, shape_dict=shapes, dtype_dict=dtypes, sanitize_input_names=False)
        except tvm.error.OpNotImplemented as e:
            raise BitfoldError(f"TVM cannot import this model: {str(e).strip().splitlines()[-1]}") from e


def compile_module(mod: tvm.IRModule, device_target: tvm.target.Target):
    if device_target.kind.name == "cuda":
        return tvm.compile(mod, target=device_target)
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    passes = (
        [relax.transform.FastMathTransform(), FastSigmoid()]
        + cpu.library_dispatch_passes(device_target)
        + cpu.legalize_passes(device_target)
        + [ScheduleStandardOps(device_target)]
        + cpu.dataflow_lower_passes(device_target)
        + cpu.finalize_passes(device_target)
    )
    with device_target:
        mod = tvm.transform.Sequential(passes)(mod)
    return tvm.compile(mod, target=device_target, relax_pipeline=None)


@relax.expr_functor.mutator
class _Sigmoid(relax.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        if getattr(call.op, "name", "") == "relax.sigmoid":
            return self.builder_.call_te(lambda x: topi.divide(1.0, topi.add(1.0, topi.fast_exp(topi.negative(x)))), call.args[0])
        return super().visit_call_(call)


@tvm.transform.module_pass(opt_level=0, name="bitfold.FastSigmoid")
class FastSigmoid:
    """sigmoid as 1 / (1 + fast_exp(−x)): TVM's ``FastMathTransform`` covers exp, softmax, erf and tanh, not it."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mutator = _Sigmoid(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gv, mutator.visit_expr(func))
        return mutator.builder_.get()


class Session:
    """A built module on one device: ``run`` takes numpy arrays in input order and returns numpy outputs."""

    def __init__(self, executable, device: str) -> None:
        self.device = tvm.cuda() if device == "cuda" else tvm.cpu()
        self.vm = relax.VirtualMachine(executable, self.device)

    def upload(self, arrays) -> list:
        return [tvm.runtime.tensor(np.ascontiguousarray(a), self.device) for a in arrays]

    def call(self, tensors: list):
        return self.vm["main"](*tensors)

    def run(self, arrays) -> list[np.ndarray]:
        out = self.call(self.upload(arrays))
        return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]


