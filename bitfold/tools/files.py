"""Atomic output writing and safe reading of user-supplied arrays (``.npz``, never pickle)."""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from bitfold.errors import BitfoldError, InputSpecError


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` file, one per graph input name; object arrays (pickle) are refused."""
    path = Path(path)
    if not path.is_file():
        raise InputSpecError(f"inputs file '{path}' does not exist; pass an .npz with one array per model input.")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise InputSpecError(f"'{path}' is not a readable .npz of plain arrays ({e}); save inputs with numpy.savez.") from None


def refuse_overwrite(source: Path, output: Path) -> None:
    if output.exists() and source.resolve() == output.resolve():
        raise BitfoldError(f"output '{output}' is the input file; bitfold never modifies its input, choose another -o.")
