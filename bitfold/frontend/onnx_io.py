"""Loading and saving ONNX files as onnx-ir models.

``load`` memory-maps external data (tensors stay on disk until read), so models far over the 2 GB protobuf limit
load in constant memory. ``save`` writes atomically: the model (and its external data, written next to it) go to a
temporary directory beside the destination and are renamed into place only once complete, so a failure never
leaves a partial output and saving over the file a model was loaded from is safe.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from bitfold.errors import ModelFileError

#: Above this many bytes of initializers, ``save`` writes tensors to an external data file. Protobuf cannot
#: serialize messages of 2 GiB or more; the margin leaves room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file (with any external data beside it) into an onnx-ir model."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file '{path}' does not exist; check the path.")
    if not path.is_file():
        raise ModelFileError(f"'{path}' is not a file; pass the path of an .onnx model file.")
    try:
        model = ir.load(path)
    except (DecodeError, RuntimeError, ValueError, onnx.onnx_cpp2py_export.checker.ValidationError) as e:
        raise ModelFileError(
            f"'{path}' is not a readable ONNX model (it may be truncated or corrupt): {_first_line(e)}."
        ) from e
    if model.graph is None or (len(model.graph) == 0 and not model.graph.outputs):
        raise ModelFileError(f"'{path}' holds no ONNX graph; it is empty or not an ONNX model file.")
    _check_external_data(model, path)
    return model


def save(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically and return the path.

    ``external_data``: True writes tensors to ``<name>.data`` beside the model, False embeds them, None (default)
    decides by size (over :data:`EXTERNAL_DATA_THRESHOLD` bytes of parameters goes external).
    """
    path = Path(path)
    if external_data is None:
        external_data = parameter_bytes(model) > EXTERNAL_DATA_THRESHOLD
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp_model = tmp_dir / path.name
        if external_data:
            ir.save(model, tmp_model, external_data=data_name)
            os.replace(tmp_dir / data_name, path.parent / data_name)
        else:
            ir.save(model, tmp_model)
        os.replace(tmp_model, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


@contextlib.contextmanager
def serialized(model: ir.Model) -> Iterator[bytes | str]:
    """The model as bytes, or, when it is too big or references external data, as the path of a temporary copy.

    For consumers (ONNX Runtime, onnx.checker) that accept either; the temporary copy lives for the ``with``.
    """
    external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    if not external and parameter_bytes(model) <= EXTERNAL_DATA_THRESHOLD:
        yield ir.to_proto(model).SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="bitfold-") as tmp:
        yield str(save(model, Path(tmp) / "model.onnx", external_data=True))


def clone(model: ir.Model) -> ir.Model:
    """An independent deep copy (through the proto), e.g. to keep the input of an in-place pipeline.

    Tensors still in an external data file stay there (the proto keeps their location; their directory is carried
    over, which the proto does not hold)."""
    copy = ir.from_proto(ir.to_proto(model))
    for name, value in model.graph.initializers.items():
        tensor, copied = value.const_value, copy.graph.initializers.get(name)
        if isinstance(tensor, ir.ExternalTensor) and copied is not None and isinstance(copied.const_value, ir.ExternalTensor):
            copied.const_value.base_dir = tensor.base_dir
    return copy


def parameter_bytes(model: ir.Model) -> int:
    """Bytes held by the main graph's initializers."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _check_external_data(model: ir.Model, path: Path) -> None:
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and not Path(tensor.path).exists():
            raise ModelFileError(
                f"'{path}' refers to external data file '{tensor.location}' which is missing; "
                "keep the .data file next to the model."
            )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0].rstrip(".") if text else type(error).__name__
