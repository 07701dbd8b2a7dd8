from __future__ import annotations

import os
import sys
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker takes its share of the cores: no oversubscribed, spinning pools
    _share = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    # BLAS pools read their size when numpy loads, so this comes before any import that pulls numpy in
    for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BITFOLD_ORT_THREADS", "TVM_NUM_THREADS"):
        os.environ.setdefault(_name, _share)
    os.environ.setdefault("BITFOLD_ORT_SPINNING", "0")

import onnx_ir as ir  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

import models  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(int(_share))


@pytest.fixture(scope="session")
def zoo_protos() -> dict[str, bytes]:
    """The synthetic zoo, exported once per session and kept serialized."""
    return {name: ir.to_proto(m).SerializeToString() for name, m in models.zoo().items()}


@pytest.fixture
def zoo(zoo_protos):
    """A fresh, mutable copy of every zoo model."""
    return {name: ir.from_proto(_parse(data)) for name, data in zoo_protos.items()}


def fresh(zoo_protos: dict[str, bytes], name: str) -> ir.Model:
    return ir.from_proto(_parse(zoo_protos[name]))


def _parse(data: bytes):
    import onnx

    return onnx.ModelProto.FromString(data)
