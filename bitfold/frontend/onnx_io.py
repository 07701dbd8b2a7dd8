"""Loading and saving ONNX files as onnx-ir models.

``load`` memory-maps external data (tensors stay on disk until read), so models far over the 2 GB protobuf limit
load in constant memory. ``save`` writes atomically: the model (and its external data, written next to it) go to a
temporary directory beside the destination and are renamed into place only once complete (a Ctrl-C between the
two renames is held until both are done), so a failure never leaves a partial output or a mismatched pair and saving over the file a model was loaded from is safe. Missing folders of the
destination are created, and removed again when the save fails or is interrupted.

``load`` refuses, with one sentence, files that parse but are not a usable graph (a truncated tail that lost the
opset imports, a node reading a value nothing defines); ``check_output`` tells before any work whether an output
path can be written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from bitfold.errors import BitfoldError, ModelFileError

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
    held = _HeldRecords()
    serde_logger = logging.getLogger(ir.serde.__name__)
    serde_logger.addFilter(held)
    try:
        model = ir.load(path)
    except (DecodeError, RuntimeError, ValueError, onnx.onnx_cpp2py_export.checker.ValidationError) as e:
        raise ModelFileError(
            f"'{path}' is not a readable ONNX model (it may be truncated or corrupt): {_first_line(e)}."
        ) from e
    finally:
        serde_logger.removeFilter(held)
    if model.graph is None or (len(model.graph) == 0 and not model.graph.outputs):
        raise ModelFileError(f"'{path}' holds no ONNX graph; it is empty or not an ONNX model file.")
    _check_graph(model, path)
    for record in held.records:  # the graph is sound: what the reader had to say still reaches the user
        serde_logger.handle(record)
    _check_external_data(model, path)
    return model


def save(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically and return the path.

    ``external_data``: True writes tensors to ``<name>.data`` beside the model, False embeds them, None (default)
    decides by size (over :data:`EXTERNAL_DATA_THRESHOLD` bytes of parameters goes external). A path that cannot be
    written (see :func:`check_output`) raises :class:`BitfoldError` before anything is written.
    """
    path = Path(path)
    if external_data is None:
        external_data = parameter_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    with writing(path):
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            tmp_model = tmp_dir / path.name
            if external_data:
                ir.save(model, tmp_model, external_data=data_name)
                with _interrupts_deferred():  # the pair changes together: never a new data file beside an old model
                    os.replace(tmp_dir / data_name, path.parent / data_name)
                    os.replace(tmp_model, path)
            else:
                with _external_embedded(model):
                    ir.save(model, tmp_model)
                os.replace(tmp_model, path)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


@contextlib.contextmanager
def _external_embedded(model: ir.Model) -> Iterator[None]:
    """Within the block, initializers still in an external data file (the one the model was loaded from) hold
    their values in memory, so a file written without external data embeds them instead of pointing at a file that
    is not beside it. The model is as it was afterwards."""
    swapped = [(value, value.const_value) for graph in model.graphs() for value in graph.initializers.values()
               if isinstance(value.const_value, ir.ExternalTensor)]  # fmt: skip
    try:
        for value, tensor in swapped:
            value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name)
        yield
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until it ends, then raise ``KeyboardInterrupt``. Outside
    the main thread (where no handler can be installed) the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def check_output(path: str | os.PathLike, *, folder: bool = False) -> None:
    """Raise :class:`BitfoldError` unless ``path`` can be written: it names a file (a folder when ``folder``),
    and its nearest existing ancestor is a folder this process may write into. Missing folders are fine (writing
    creates them)."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        if folder:
            raise BitfoldError(f"output '{path}' is a file, not a folder; give a folder path for the files bitfold writes.")
        raise BitfoldError(f"output '{path}' is a folder; give a file path, e.g. '{path / 'model.onnx'}'.")
    start = path if folder else path.parent
    existing = next(p for p in (start, *start.parents) if p.exists())
    if not existing.is_dir():
        raise BitfoldError(f"cannot write '{path}': '{existing}' is a file, not a folder; choose another output path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BitfoldError(f"cannot write '{path}': folder '{existing}' is read-only; choose a folder you can write to.")


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Around writing the file ``path``: checks it first (:func:`check_output`), creates its missing folders, and
    on any failure, Ctrl-C included, removes the folders it created before the exception goes on. The body writes
    to a temporary name beside ``path`` and renames it into place."""
    check_output(path)
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # deepest first
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield
    except BaseException:
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


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


class _HeldRecords(logging.Filter):
    """Holds back every record of a logger while attached (the reader's warnings about an invalid graph, which
    :func:`_check_graph` reports as one sentence instead)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


def _check_graph(model: ir.Model, path: Path) -> None:
    """Refuse a parsed model that is not a usable graph: default-domain ops without an ONNX opset import, a node
    input or graph output that nothing defines (what a cut or overwritten file leaves behind)."""
    corrupt = f"'{path}' is not a valid ONNX model (it may be truncated or corrupt)"
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    if any(node.domain in ("", "ai.onnx") for node in nodes) and not {"", "ai.onnx"} & set(model.opset_imports):
        raise ModelFileError(f"{corrupt}: it imports no version of the ONNX operator set.")

    def defined(value: ir.Value) -> bool:
        return value.producer() is not None or value.is_graph_input() or value.is_initializer()

    for node in nodes:
        for value in node.inputs:
            if value is not None and not defined(value):
                raise ModelFileError(
                    f"{corrupt}: node '{node.name or node.op_type}' reads '{value.name}', which no node, graph input or initializer defines."
                )
    for value in model.graph.outputs:
        if not defined(value):
            raise ModelFileError(f"{corrupt}: graph output '{value.name}' is computed by no node.")
    for text in _texts(model, nodes):
        if not isinstance(text, str | None):
            raise ModelFileError(f"{corrupt}: the name or text {text!r} is not valid UTF-8.")


def _texts(model: ir.Model, nodes: list[ir.Node]) -> Iterator[object]:
    """Every name and text field of the model, graph, nodes and values (a field that is not valid UTF-8 in the
    file arrives as bytes)."""
    graph = model.graph
    yield from (model.producer_name, model.producer_version, model.domain, model.doc_string, graph.name, graph.doc_string)
    yield from (t for props in (model.metadata_props, graph.metadata_props) for item in props.items() for t in item)
    values = [*graph.inputs, *graph.outputs, *graph.initializers.values()]
    for node in nodes:
        yield from (node.name, node.op_type, node.domain, node.doc_string)
        yield from (t for item in node.metadata_props.items() for t in item)
        values.extend(node.outputs)
    for value in values:
        yield value.name
        yield from (t for item in value.metadata_props.items() for t in item)


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
