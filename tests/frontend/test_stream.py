"""Streamed weights: read from their file at each use (nothing mapped or cached), rewritten ones appended to a
scratch file; a recipe run streamed writes the same model as one run in memory."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import fresh

import bitfold
from bitfold.passes.canonical import CANONICAL
from bitfold.frontend.stream import WeightStore, file_tensor, read_on_demand, storing
from bitfold.passes.initializers import add_initializer


def test_file_tensor_reads_each_time_and_keeps_nothing(tmp_path):
    array = np.arange(24, dtype=np.float32).reshape(4, 6)
    path = tmp_path / "w.bin"
    path.write_bytes(b"xxxx" + array.tobytes())
    t = file_tensor(path, 4, array.nbytes, ir.DataType.FLOAT, ir.Shape([4, 6]), "w")
    first = t.numpy()
    np.testing.assert_array_equal(first, array)
    first[0, 0] = 99.0  # a private copy: the next read is the file's
    assert t.numpy()[0, 0] == 0.0
    with open(path, "r+b") as f:  # no cache: a change to the file is seen
        f.seek(4)
        f.write(np.float32(7.0).tobytes())
    assert t.numpy()[0, 0] == 7.0


@pytest.mark.parametrize("dtype", [np.float32, np.float16, "int4", "bfloat16"])
def test_store_round_trips_every_dtype(tmp_path, dtype):
    import ml_dtypes

    dtype = getattr(ml_dtypes, dtype) if isinstance(dtype, str) else dtype
    rng = np.random.default_rng(0)
    array = rng.integers(-8, 8, (600, 257)).astype(dtype)  # odd element count: int4 packs two per byte
    graph = ir.Graph([], [], nodes=[])
    store = WeightStore(tmp_path)
    with storing(store):
        big = add_initializer(graph, "big", array)
        small = add_initializer(graph, "small", array[:2, :3])
    store.close()
    assert store.bytes > 0 and isinstance(big.const_value, ir.LazyTensor)
    assert not isinstance(small.const_value, ir.LazyTensor)  # under the threshold: in memory
    np.testing.assert_array_equal(big.const_value.numpy(), array)
    assert big.const_value.dtype == ir.tensor(array).dtype
    outside = add_initializer(graph, "after", array)  # the store is no longer active
    assert not isinstance(outside.const_value, ir.LazyTensor)


def test_streamed_recipe_writes_the_in_memory_model(zoo_protos, tmp_path):
    source = bitfold.save(fresh(zoo_protos, "tiny-lm"), tmp_path / "in" / "m.onnx", external_data=True)
    steps = [*CANONICAL, {"name": "quantize-weights", "method": "rtn", "bits": 4, "group_size": 16}]
    WeightStore.threshold, saved = 0, WeightStore.threshold  # every tensor through the store
    try:
        streamed = bitfold.load(source)
        assert read_on_demand(streamed) > 0
        store = WeightStore(tmp_path)
        with storing(store):
            bitfold.optimize(streamed, steps)
            a = bitfold.save(streamed, tmp_path / "a" / "m.onnx", external_data=True)
        store.close()
    finally:
        WeightStore.threshold = saved
    assert store.bytes > 0
    b = bitfold.save(bitfold.optimize(bitfold.load(source), steps)[0], tmp_path / "b" / "m.onnx", external_data=True)
    ma, mb = bitfold.load(a), bitfold.load(b)
    assert any(node.op_type == "DequantizeLinear" for node in ma.graph)
    assert sorted(ma.graph.initializers) == sorted(mb.graph.initializers)
    for name, value in mb.graph.initializers.items():
        np.testing.assert_array_equal(ma.graph.initializers[name].const_value.numpy(), value.const_value.numpy())
