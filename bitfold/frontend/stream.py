"""Weights that live on disk and are read each time they are used: the memory-bounded path of ``optimize``.

A model loaded by :func:`~bitfold.frontend.onnx_io.load` memory-maps its external data, and every page a pass
reads stays resident until the model is dropped; the tensors a pass writes stay in memory until the model is saved.
For a model several times the size of memory neither is affordable. Streaming replaces both:

- :func:`read_on_demand` turns every external initializer into a tensor that reads its bytes from the file each
  time it is asked for and keeps nothing (no mapping, no cache), so a weight costs memory only while a pass holds
  the array it read;
- inside :func:`storing`, every initializer a pass adds (through ``add_initializer``) of at least
  :attr:`WeightStore.threshold` bytes is appended to a scratch file and represented by such a tensor.

Saving then copies tensor by tensor into the output's external data. Peak memory follows the largest tensor a pass
works on at once, not the model.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir


def trim_heap() -> None:
    """Hand the heap's free memory back to the operating system (glibc's ``malloc_trim``; nothing elsewhere).

    A pass that works weight by weight frees each weight's large temporaries before the next; glibc keeps freed
    blocks below its (adaptive) mmap threshold in the heap, so the resident memory of one weight's solve would stay
    charged while the next one allocates its own."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
            _LIBC = _LIBC if _LIBC and hasattr(_LIBC, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None
_STORE: contextvars.ContextVar[WeightStore | None] = contextvars.ContextVar("bitfold_weight_store", default=None)


def file_tensor(path: str | os.PathLike, offset: int, length: int, dtype: ir.DataType, shape: ir.Shape, name: str) -> ir.LazyTensor:
    """A tensor whose bytes are ``length`` bytes at ``offset`` of ``path``, read (into a private array) at each use."""
    path = Path(path)

    def read() -> ir.TensorProtocol:
        external = ir.ExternalTensor(path.name, offset, length, dtype, shape=shape, name=name, base_dir=path.parent)
        try:
            return ir.Tensor(np.array(external.numpy(), copy=True), dtype=dtype, name=name)
        finally:
            # unmap: the pages read do not stay charged to this process (unless a view of them is still held, e.g.
            # by a profiler keeping a frame alive: the mapping then closes when that view goes)
            with contextlib.suppress(BufferError):
                external.release()

    return ir.LazyTensor(read, dtype=dtype, shape=shape, name=name, cache=False)


def read_on_demand(model: ir.Model) -> int:
    """Replace every external initializer of ``model``'s graphs by a :func:`file_tensor` over the same bytes;
    returns how many were replaced. The file is only read."""
    replaced = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                value.const_value = file_tensor(tensor.path, tensor.offset or 0, tensor.length or tensor.nbytes,
                                                tensor.dtype, tensor.shape, tensor.name or value.name or "")  # fmt: skip
                tensor.release()
                replaced += 1
    return replaced


class WeightStore:
    """An append-only scratch file holding the tensors passes write while streaming."""

    #: smaller arrays (scales, shapes, zero points) stay in memory
    threshold = 64 * 1024

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / "bitfold-weights.bin"
        self._file = open(self.path, "ab")  # noqa: SIM115 (closed by close())
        self.bytes = 0

    def put(self, name: str, array: np.ndarray) -> ir.TensorProtocol:
        tensor = ir.tensor(array, name=name)
        if tensor.nbytes < self.threshold:
            return tensor
        offset = self._file.tell()
        tensor.tofile(self._file)
        self._file.flush()
        length = self._file.tell() - offset
        self.bytes += length
        return file_tensor(self.path, offset, length, tensor.dtype, tensor.shape, name)

    def close(self) -> None:
        self._file.close()


@contextlib.contextmanager
def storing(store: WeightStore) -> Iterator[WeightStore]:
    """Within the block, initializers added through ``add_initializer`` go to ``store``."""
    token = _STORE.set(store)
    try:
        yield store
    finally:
        _STORE.reset(token)


def current_store() -> WeightStore | None:
    return _STORE.get()
