"""Atomic output writing and safe reading of user-supplied arrays (``.npz``, never pickle)."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from bitfold.errors import BitfoldError, InputSpecError
from bitfold.frontend.inputs import load_arrays  # noqa: F401  (its home is the frontend; imported from here by tools)
from bitfold.frontend.onnx_io import writing


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path`` and rename it into place. Missing folders are created (and
    removed again on failure), a path that cannot be written raises :class:`BitfoldError` before anything is
    written, and a failed or interrupted write leaves ``path`` as it was."""
    path = Path(path)
    with writing(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure as PNG atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return write_atomic(path, buffer.getvalue())


def save_arrays(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    buffer = io.BytesIO()
    np.savez(buffer, **dict(arrays))
    return write_atomic(path, buffer.getvalue())


def refuse_overwrite(source: Path, output: Path) -> None:
    if output.exists() and source.resolve() == output.resolve():
        raise BitfoldError(f"output '{output}' is the input file; bitfold never modifies its input, choose another -o.")
