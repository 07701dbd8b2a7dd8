"""Turn a registered kernel and its prepared operands into a scheduled PrimFunc, and build one on its own (the
kernels' tests and benchmarks call it directly, without a model around it).

Targets: ``target("cpu")`` is llvm for the host CPU (its features detected by LLVM, so AVX-512 where present);
``target("cuda")`` is CUDA for the local GPU's architecture, or ``sm_90`` where there is no GPU: CUDA code is
generated and compiled by nvcc either way.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tvm
from tvm import s_tir, te, tirx

from bitfold.kernels import Kernel, Prepared, schedule

# TVM sizes its thread pool by physical cores, which is 1 on a 2-vCPU machine whose vCPUs are SMT siblings; ORT and
# torch use every logical CPU, and so do bitfold's kernels (read when TVM starts its pool, so set before any run)
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

#: PrimFunc attributes that keep Relax from fusing or re-scheduling a kernel
ATTRS = {"tirx.is_scheduled": True, "op_pattern": 8}


def target(device: str) -> tvm.target.Target:
    if device == "cuda":
        dev = tvm.cuda()
        arch = f"sm_{dev.compute_version.replace('.', '')}" if dev.exist else "sm_90"
        return tvm.target.Target({"kind": "cuda", "arch": arch}, host=target("cpu"))
    from tvm.target import codegen

    return tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})


def stages(out: te.Tensor) -> list[str]:
    """Names of the compute stages behind ``out``, producers first."""
    order: list[str] = []

    def visit(tensor: te.Tensor) -> None:
        op = tensor.op
        if not isinstance(op, te.ComputeOp) or op.name in order:
            return
        for source in op.input_tensors:
            visit(source)
        order.append(op.name)

    visit(out)
    return order


def prim_func(kernel: Kernel, prepared: Prepared, m: int, device_target: tvm.target.Target) -> tirx.PrimFunc:
    """The kernel for activations [m, K], scheduled for ``device_target``; arguments (X, *arrays, Y)."""
    func = kernel.lowering(prepared, m, device_target) if kernel.lowering else None
    if func is None:
        x = te.placeholder((m, prepared.k), "float32", "X")
        arrays = [te.placeholder(a.shape, str(a.dtype), f"w{i}") for i, a in enumerate(prepared.arrays)]
        y = kernel.compute(x, arrays, **prepared.params)
        sch = s_tir.Schedule(te.create_prim_func([x, *arrays, y]))
        (kernel.schedule or schedule.apply)(sch, stages(y), device_target)
        func = sch.mod["main"].without_attr("global_symbol")
    for key, value in ATTRS.items():
        func = func.with_attr(key, value)
    return func


def _module(kernel: Kernel, prepared: Prepared, m: int, device_target: tvm.target.Target) -> tvm.IRModule:
    return tvm.IRModule({"main": prim_func(kernel, prepared, m, device_target).with_attr("global_symbol", "main")})


@dataclasses.dataclass
class Built:
    """One compiled kernel with its operands on the device; ``__call__`` maps x [m, K] to y [m, N] in numpy."""

    function: object
    device: object
    arrays: list
    m: int
    n: int

    def __call__(self, x: np.ndarray) -> np.ndarray:
        args = self.arguments(x)
        self.function(*args)
        return args[-1].numpy()

    def arguments(self, x: np.ndarray, arrays: list | None = None) -> list:
        """Device tensors (X, *arrays, Y); ``arrays`` replaces the weights (benchmarks cycle through copies)."""
        y = tvm.runtime.tensor(np.zeros((self.m, self.n), np.float32), self.device)
        return [tvm.runtime.tensor(np.ascontiguousarray(x, np.float32), self.device), *(arrays or self.arrays), y]

    def upload(self, prepared: Prepared) -> list:
        return [tvm.runtime.tensor(a, self.device) for a in prepared.arrays]


def build(kernel: Kernel, prepared: Prepared, m: int, device: str = "cpu") -> Built:
    device_target = target(device)
    lib = tvm.compile(_module(kernel, prepared, m, device_target), target=device_target)
    dev = tvm.cuda() if device == "cuda" else tvm.cpu()
    built = Built(lib["main"], dev, [], m, prepared.n)
    built.arrays = built.upload(prepared)
    return built


def source(kernel: Kernel, prepared: Prepared, m: int, device: str = "cuda") -> str:
    """Generated device source of the kernel (CUDA C for ``cuda``): compiled by nvcc, with or without a GPU."""
    device_target = target(device)
    lib = tvm.compile(_module(kernel, prepared, m, device_target), target=device_target)
    modules = lib.mod.imports if hasattr(lib, "mod") else lib.imports
    return "\n".join(module.inspect_source() for module in modules)
