"""Work spread over a 2-worker local Ray cluster computes what the serial run computes: the executor's order and
per-worker setup, allocate's sensitivities and choice, GPTQ's quantized model; the CLI's --ray flags."""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx_ir as ir
import pytest
from conftest import fresh

import bitfold
from bitfold import parallel
from bitfold.passes.canonical import CANONICAL
from bitfold.quant.calibration import CalibrationData
from bitfold.tools import allocate
from bitfold.tools.cli import main

ray = pytest.importorskip("ray")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import a test module by name


@pytest.fixture(scope="module")
def cluster():
    executor = parallel.RayExecutor(workers=2)
    with parallel.executing(executor):
        yield executor


def _setup(shared):
    return {"offset": shared, "pid": os.getpid(), "threads": parallel.worker_threads()}


def _work(state, item):
    return item + state["offset"], state["pid"], state["threads"]


def test_map_keeps_item_order_and_builds_state_once_per_worker(cluster):
    items = iter(range(40))  # a generator: drawn lazily
    results = list(parallel.current().map(_work, items, setup=_setup, shared=1000))
    assert [r[0] for r in results] == [i + 1000 for i in range(40)]
    pids = {r[1] for r in results}
    assert len(pids) == 2 and os.getpid() not in pids  # both workers took items, none ran here
    assert {r[2] for r in results} == {1}
    serial = list(parallel.Serial().map(_work, range(40), setup=_setup, shared=1000))
    assert [r[0] for r in serial] == [r[0] for r in results] and serial[0][2] is None


@pytest.fixture(scope="module")
def tiny(zoo_protos):
    model, _ = bitfold.optimize(fresh(zoo_protos, "tiny-lm"), list(CANONICAL))
    rng = np.random.default_rng(0)
    calibration = CalibrationData([{"input_ids": rng.integers(0, 96, (1, 8)).astype(np.int64)} for _ in range(4)])
    return model, calibration


def test_allocate_on_ray_equals_serial(tiny, cluster):
    model, calibration = tiny
    with parallel.executing(parallel.Serial()):
        serial = allocate.measure(model, calibration, ["int8", "int3", "int2"], params={"method": "gptq"})
    spread = allocate.measure(model, calibration, ["int8", "int3", "int2"], params={"method": "gptq"})
    np.testing.assert_array_equal(spread.sensitivity, serial.sensitivity)
    np.testing.assert_array_equal(spread.cost, serial.cost)
    budget = float(serial.cost[:, 1].sum() / serial.weights.sum())
    np.testing.assert_array_equal(allocate.solve(spread, budget).choice, allocate.solve(serial, budget).choice)


def test_gptq_on_ray_writes_the_serial_model(tiny, cluster):
    model, calibration = tiny
    step = [{"name": "quantize-weights", "method": "gptq", "bits": 3, "group_size": 16}]
    with parallel.executing(parallel.Serial()):
        serial, _ = bitfold.optimize(bitfold.clone(model), step, calibration=calibration)
    spread, _ = bitfold.optimize(bitfold.clone(model), step, calibration=calibration)
    assert ir.to_proto(spread).SerializeToString() == ir.to_proto(serial).SerializeToString()


def test_cli_refuses_workers_without_ray(tmp_path, zoo_protos, capsys):
    path = bitfold.save(fresh(zoo_protos, "tiny-lm"), tmp_path / "lm.onnx")
    code = main(["optimize", str(path), "-p", "fold-constants", "-o", str(tmp_path / "out.onnx"), "--workers", "2"])
    assert code == 2 and "--workers needs --ray" in capsys.readouterr().err


def test_cli_allocate_with_ray_writes_the_serial_recipe(tiny, cluster, tmp_path):
    model, _ = tiny
    path = bitfold.save(model, tmp_path / "lm.onnx")
    np.savez(tmp_path / "calib.npz", input_ids=np.random.default_rng(0).integers(0, 96, (4, 1, 8)))
    common = ["allocate", str(path), "--bits", "5", "--formats", "int8,int4", "--calibration", str(tmp_path / "calib.npz")]
    with parallel.executing(parallel.Serial()):
        assert main([*common, "-o", str(tmp_path / "serial.toml")]) == 0
    assert main([*common, "-o", str(tmp_path / "ray.toml"), "--ray", "--workers", "2"]) == 0
    assert (tmp_path / "ray.toml").read_text() == (tmp_path / "serial.toml").read_text()


def test_sequential_gptq_solves_on_ray_write_the_serial_model(tiny, cluster):
    model, calibration = tiny
    step = [{"name": "reconstruct", "bits": 3, "group_size": 16, "format": "fake", "clip_steps": 0, "round_steps": 0}]
    with parallel.executing(parallel.Serial()):
        serial, report = bitfold.optimize(bitfold.clone(model), step, calibration=calibration)
    assert any(note.startswith("sequential GPTQ seconds") for note in report.passes[0].notes)
    spread, _ = bitfold.optimize(bitfold.clone(model), step, calibration=calibration)
    assert ir.to_proto(spread).SerializeToString() == ir.to_proto(serial).SerializeToString()
