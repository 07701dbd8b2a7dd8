from __future__ import annotations

import hashlib

import numpy as np
import onnx_ir as ir
import pytest
from conftest import fresh

import bitfold
from bitfold.errors import ModelFileError
from bitfold.frontend import onnx_io


def _outputs(model, feeds):
    return list(bitfold.compile(model, "ort", "cpu").run(feeds).values())


@pytest.mark.parametrize("external", [False, True])
def test_round_trip_preserves_outputs(zoo_protos, tmp_path, external):
    model = fresh(zoo_protos, "encoder-layernorm")
    feeds = bitfold.sample_feeds(model)
    path = bitfold.save(model, tmp_path / "m.onnx", external_data=external)
    assert (tmp_path / "m.onnx.data").exists() == external
    loaded = bitfold.load(path)
    for a, b in zip(_outputs(model, feeds), _outputs(loaded, feeds), strict=True):
        np.testing.assert_array_equal(a, b)
    if external:
        assert any(isinstance(v.const_value, ir.ExternalTensor) for v in loaded.graph.initializers.values())


def test_saving_over_the_memory_mapped_source_is_safe(zoo_protos, tmp_path):
    path = bitfold.save(fresh(zoo_protos, "mlp"), tmp_path / "m.onnx", external_data=True)
    loaded = bitfold.load(path)
    expected = {k: v.const_value.numpy().copy() for k, v in loaded.graph.initializers.items()}
    bitfold.save(loaded, path, external_data=True)
    again = bitfold.load(path)
    for name, value in expected.items():
        np.testing.assert_array_equal(again.graph.initializers[name].const_value.numpy(), value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"], "no temp files left behind"


def test_model_loaded_from_external_data_saves_self_contained(zoo_protos, tmp_path):
    """A model read from a file with external data, saved elsewhere without it, carries its weights (not a
    reference to a data file that is not beside it); the model in memory still reads from its file."""
    source = bitfold.save(fresh(zoo_protos, "mlp"), tmp_path / "a" / "m.onnx", external_data=True)
    loaded = bitfold.load(source)
    expected = {k: v.const_value.numpy().copy() for k, v in loaded.graph.initializers.items()}
    path = bitfold.save(loaded, tmp_path / "b" / "m.onnx", external_data=False)
    assert [p.name for p in path.parent.iterdir()] == ["m.onnx"]
    again = bitfold.load(path)
    assert not any(isinstance(v.const_value, ir.ExternalTensor) for v in again.graph.initializers.values())
    for name, value in expected.items():
        np.testing.assert_array_equal(again.graph.initializers[name].const_value.numpy(), value)
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in loaded.graph.initializers.values() if v.const_value.nbytes > 1024)


def test_failed_save_leaves_no_partial_output(zoo_protos, tmp_path, monkeypatch):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous")

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx_io.ir, "save", explode)
    with pytest.raises(OSError):
        bitfold.save(fresh(zoo_protos, "mlp"), target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


@pytest.mark.slow
def test_model_over_2gb_goes_external_and_loads_memory_mapped(tmp_path):
    n = 560_000_000  # 2.24 GB of float32: over the protobuf limit
    x = ir.val("x", ir.DataType.FLOAT, [1])
    big = ir.Value(name="big", const_value=ir.tensor(np.zeros(n, dtype=np.float32)))
    gather_idx = ir.Value(name="idx", const_value=ir.tensor(np.array([n - 1], dtype=np.int64)))
    g = ir.node("Gather", [big, gather_idx])
    y = ir.node("Add", [x, g.outputs[0]])
    y.outputs[0].name, y.outputs[0].dtype, y.outputs[0].shape = "y", ir.DataType.FLOAT, ir.Shape([1])
    graph = ir.Graph([x], y.outputs, nodes=[g, y], initializers=[big, gather_idx], opset_imports={"": 21}, name="big")
    model = ir.Model(graph, ir_version=10)
    assert onnx_io.parameter_bytes(model) > 2**31
    path = bitfold.save(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx").stat().st_size < 10_000
    assert (tmp_path / "big.onnx.data").stat().st_size >= n * 4
    del model, big, graph
    loaded = bitfold.load(path)
    tensor = loaded.graph.initializers["big"].const_value
    assert isinstance(tensor, ir.ExternalTensor) and tensor.nbytes == n * 4
    out = bitfold.compile(loaded, "ort", "cpu").run({"x": np.array([3.0], dtype=np.float32)})
    np.testing.assert_array_equal(out["y"], [3.0])


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (b"", "holds no ONNX graph"),
        (b"this is not protobuf at all \xff\xff", "not a readable ONNX model"),
    ],
)
def test_bad_files_raise_one_clear_sentence(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelFileError, match=message):
        bitfold.load(path)


def test_truncated_file_is_reported_and_left_unchanged(zoo_protos, tmp_path):
    full = tmp_path / "full.onnx"
    bitfold.save(fresh(zoo_protos, "cnn-bn"), full)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    digest = hashlib.sha256(cut.read_bytes()).hexdigest()
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        bitfold.load(cut)
    assert hashlib.sha256(cut.read_bytes()).hexdigest() == digest


def test_missing_external_data_is_named(zoo_protos, tmp_path):
    path = bitfold.save(fresh(zoo_protos, "mlp"), tmp_path / "m.onnx", external_data=True)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(ModelFileError, match="external data file 'm.onnx.data' which is missing"):
        bitfold.load(path)


def test_ctrl_c_between_the_renames_of_model_and_data_leaves_a_matching_pair(zoo_protos, tmp_path, monkeypatch):
    """Saving over an earlier model with external data: a SIGINT that arrives after the data file is in place is held
    until the model file is too, then raised; the files on disk are the new pair and load with the new weights."""
    import os
    import signal
    from pathlib import Path

    from bitfold.frontend import onnx_io

    path = bitfold.save(fresh(zoo_protos, "mlp"), tmp_path / "m.onnx", external_data=True)
    new = fresh(zoo_protos, "mlp")
    for value in new.graph.initializers.values():
        value.const_value = ir.tensor(value.const_value.numpy() * 2, name=value.name)
    real = os.replace

    def replace(src, dst):
        real(src, dst)
        if Path(dst) == tmp_path / "m.onnx.data":
            signal.raise_signal(signal.SIGINT)  # Ctrl-C right after the data file moved into place

    monkeypatch.setattr(onnx_io.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        bitfold.save(new, path, external_data=True)
    loaded = bitfold.load(path)
    for name, value in new.graph.initializers.items():
        np.testing.assert_array_equal(loaded.graph.initializers[name].const_value.numpy(), value.const_value.numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
