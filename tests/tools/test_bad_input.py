"""The bad-input sweep: every mistake in the table of docs/cli.md ("Bad input"), through the CLI and the Python API.

Each row is one mistake. Through the CLI it must give its exit code (2 for bad input, 130 for Ctrl-C), one line on
stderr holding the row's sentence and no traceback, and leave the folder as it was: every file byte-identical, no
output, no temporary file, no created folder. Through the API the same mistake raises the row's exception (a
``BitfoldError`` subclass with the same one sentence, or ``KeyboardInterrupt``) and leaves the folder as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import fresh

import bitfold
from bitfold.errors import BitfoldError, InputSpecError, ModelFileError, PassParameterError, PassPreconditionError, RecipeError, UnknownPassError
from bitfold.frontend import onnx_io
from bitfold.quant.calibration import CalibrationData
from bitfold.tools.cli import main
from bitfold.tools.files import write_atomic


@dataclasses.dataclass
class Workspace:
    """A folder holding a small CNN (``x: float32[2x3x16x16]``), a tiny language model (``input_ids``) and, in
    ``ext/``, a model saved with external data whose ``.data`` file is missing."""

    root: Path
    cnn: Path
    lm: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def out(self) -> Path:
        return self.root / "out.onnx"

    def write(self, name: str, data: bytes | str) -> Path:
        path = self.root / name
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
        return path

    def npz(self, name: str = "calib.npz", **arrays: np.ndarray) -> Path:
        path = self.root / name
        np.savez(path, **arrays)
        return path

    def proto(self, edit: Callable[[onnx.ModelProto], None], name: str = "edited.onnx") -> Path:
        proto = onnx.load(self.cnn)
        edit(proto)
        return self.write(name, proto.SerializeToString())

    def read_only(self, name: str) -> Path:
        if os.geteuid() == 0:
            pytest.skip("running as root, which ignores folder permissions")
        folder = self.root / name
        folder.mkdir()
        folder.chmod(0o555)
        return folder

    def optimize(self, model: Path, *extra, passes: str = "remove-dead", out: Path | None = None) -> list:
        return ["optimize", model, "-p", passes, "-o", out or self.out, *extra]

    def calibrate(self, calibration: Path | str, model: Path | None = None) -> list:
        return self.optimize(model or self.cnn, "--calibration", calibration, passes="quantize-activations")


@dataclasses.dataclass(frozen=True)
class Scenario:
    argv: list
    #: The same mistake through the Python API; None where it has no API form.
    api: Callable[[], object] | None
    #: Paths the run must create (only for rows that succeed).
    creates: tuple[Path, ...] = ()


@dataclasses.dataclass(frozen=True)
class Case:
    case: str
    setup: Callable[[Workspace], Scenario]
    #: A fragment of the one sentence on stderr (CLI) and in the exception (API); ROOT stands for the workspace.
    says: str
    error: type[BaseException] = BitfoldError
    code: int = 2


def _rows(rows: list[tuple]) -> list:
    return [pytest.param(Case(*row[:5]), id=row[0], marks=row[5] if len(row) > 5 else ()) for row in rows]


def _x(n: int = 3, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 2, 3, 16, 16)).astype(dtype)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _bad_utf8_name(ws: Workspace) -> Path:
    """The model with one byte of a node's name overwritten by 0xff (the length stays, the text is not UTF-8)."""
    data = ws.cnn.read_bytes()
    name = next(n for n in (node.name.encode() for node in onnx.load(ws.cnn).graph.node) if data.count(n) == 1)
    return ws.write("bad-name.onnx", data.replace(name, name[:-1] + b"\xff"))


def _interrupt_save(ws: Workspace) -> None:
    """Ctrl-C in the middle of writing the model: the write puts half the bytes down, then KeyboardInterrupt."""

    def save(model, path, **kwargs):
        data = ir.to_proto(model).SerializeToString()
        Path(path).write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt

    ws.monkeypatch.setattr(onnx_io.ir, "save", save)


def _interrupt_write(ws: Workspace) -> None:
    """Ctrl-C in the middle of ``write_atomic``'s write: half the bytes reach the temp file, then KeyboardInterrupt."""
    real = os.fdopen

    class Interrupted:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise KeyboardInterrupt

    def fdopen(fd, mode="r", *args, **kwargs):
        f = real(fd, mode, *args, **kwargs)
        return Interrupted(f) if mode == "wb" else f

    ws.monkeypatch.setattr(os, "fdopen", fdopen)


def _model(ws: Workspace, path: Path) -> Scenario:
    return Scenario(ws.optimize(path), lambda: bitfold.load(path))


def _recipe(ws: Workspace, text: str) -> Scenario:
    recipe = ws.write("recipe.toml", text)
    return Scenario(["optimize", ws.cnn, "-r", recipe, "-o", ws.out], lambda: bitfold.Recipe.load(recipe))


def _npz(ws: Workspace, path: Path) -> Scenario:
    return Scenario(ws.calibrate(path), lambda: CalibrationData.from_npz(path, bitfold.load(ws.cnn)))


def _source(ws: Workspace, name: str, model: Path) -> Scenario:
    return Scenario(ws.calibrate(name, model), lambda: CalibrationData.from_source(name, bitfold.load(model)))


def _save(ws: Workspace, out: Path, *extra) -> Scenario:
    return Scenario(ws.optimize(ws.cnn, *extra, out=out), lambda: bitfold.save(bitfold.load(ws.cnn), out))


def _rotate_on_cnn(ws: Workspace) -> Scenario:
    return Scenario(ws.optimize(ws.cnn, passes="rotate"), lambda: bitfold.optimize(bitfold.load(ws.cnn), ["rotate"]))


def _ctrl_c(ws: Workspace, out: Path) -> Scenario:
    _interrupt_save(ws)
    return _save(ws, out)


def _ctrl_c_npz(ws: Workspace) -> Scenario:
    _interrupt_write(ws)
    out = ws.root / "y.npz"
    return Scenario(["run", ws.cnn, "--output", out], lambda: write_atomic(out, b"{}" * 1000))


def _missing_folder(ws: Workspace) -> Scenario:
    out = ws.root / "new" / "sub" / "out.onnx"
    return Scenario(ws.optimize(ws.cnn, out=out), lambda: bitfold.save(bitfold.load(ws.cnn), out), creates=(out,))


#: Mistakes only the command line can make.
CLI_ONLY = {"debug folder is a file", "output is the input"}
INTERRUPTED = "interrupted (Ctrl-C); files not yet complete were not written."

# fmt: off
CASES = _rows([
    # case, setup, what bitfold says, API exception, exit code
    # -- model files --
    ("model file missing", lambda ws: _model(ws, ws.root / "nope.onnx"), "model file 'ROOT/nope.onnx' does not exist; check the path.", ModelFileError),
    ("model path is a folder", lambda ws: _model(ws, ws.root), "is not a file; pass the path of an .onnx model file", ModelFileError),
    ("empty model file", lambda ws: _model(ws, ws.write("empty.onnx", b"")), "holds no ONNX graph", ModelFileError),
    ("truncated model file", lambda ws: _model(ws, ws.write("cut.onnx", ws.cnn.read_bytes()[: ws.cnn.stat().st_size // 3])),
     "is not a readable ONNX model (it may be truncated or corrupt)", ModelFileError),
    ("not an ONNX file", lambda ws: _model(ws, ws.write("junk.onnx", b"\x00garbage" * 50)),
     "is not a readable ONNX model (it may be truncated or corrupt)", ModelFileError),
    ("model without opset imports", lambda ws: _model(ws, ws.proto(lambda p: p.ClearField("opset_import"))),
     "is not a valid ONNX model (it may be truncated or corrupt): it imports no version of the ONNX operator set.", ModelFileError),
    ("node reads an undefined value", lambda ws: _model(ws, ws.proto(lambda p: p.graph.node[1].input.__setitem__(0, "nowhere"))),
     "reads 'nowhere', which no node, graph input or initializer defines.", ModelFileError),
    ("graph output computed by no node", lambda ws: _model(ws, ws.proto(lambda p: setattr(p.graph.output[0], "name", "nowhere"))),
     "graph output 'nowhere' is computed by no node.", ModelFileError),
    ("name that is not UTF-8", lambda ws: _model(ws, _bad_utf8_name(ws)), "is not valid UTF-8.", ModelFileError),
    ("external data file missing", lambda ws: _model(ws, ws.root / "ext" / "m.onnx"),
     "refers to external data file 'm.onnx.data' which is missing; keep the .data file next to the model.", ModelFileError),
    # -- recipes --
    ("recipe file missing", lambda ws: Scenario(["optimize", ws.cnn, "-r", ws.root / "nope.toml", "-o", ws.out],
                                                 lambda: bitfold.Recipe.load(ws.root / "nope.toml")),
     "recipe file 'ROOT/nope.toml' does not exist; check the path.", RecipeError),
    ("recipe is not TOML", lambda ws: _recipe(ws, '[[pass]]\nname = "fold-batchnorm\n'), "is not valid TOML", RecipeError),
    ("unknown top-level key", lambda ws: _recipe(ws, '[[passes]]\nname = "fold-batchnorm"\n'),
     "has unknown top-level key 'passes'; only [[pass]] tables are allowed.", RecipeError),
    ("step without a name", lambda ws: _recipe(ws, '[[pass]]\nbits = 4\n'), "recipe step 1 has no 'name'", RecipeError),
    ("unknown pass", lambda ws: _recipe(ws, '[[pass]]\nname = "fold-batchnrm"\n'),
     "unknown pass 'fold-batchnrm'; did you mean 'fold-batchnorm'?", UnknownPassError),
    ("unknown parameter", lambda ws: _recipe(ws, '[[pass]]\nname = "fold-batchnorm"\nbits = 4\n'),
     "pass 'fold-batchnorm' takes no parameters; remove 'bits'.", PassParameterError),
    ("parameter of the wrong type", lambda ws: _recipe(ws, '[[pass]]\nname = "fold-constants"\ninput_size_limit = "big"\n'),
     "parameter 'input_size_limit' of pass 'fold-constants' must be of type int, got 'big'.", PassParameterError),
    ("parameter out of range", lambda ws: _recipe(ws, '[[pass]]\nname = "rotate"\nlearn_bits = 9\n'),
     "pass 'rotate': learn_bits must be in [2, 8]", PassParameterError),
    ("parameter not finite", lambda ws: _recipe(ws, '[[pass]]\nname = "quantize-weights"\nsink_weight = nan\n'),
     "parameter 'sink_weight' of pass 'quantize-weights' is nan; give a finite number.", RecipeError),
    # -- calibration files --
    ("calibration file missing", lambda ws: _npz(ws, ws.root / "nope.npz"), "calibration file 'ROOT/nope.npz' does not exist; pass an .npz with one array per model input.", InputSpecError),
    ("calibration file not an .npz", lambda ws: _npz(ws, ws.write("junk.npz", b"not a zip")),
     "is not a readable .npz of plain arrays (not a zip archive)", InputSpecError),
    ("calibration file is a single .npy", lambda ws: _npz(ws, ws.write("one.npz", _npy_bytes(_x()))),
     "is a single .npy array, not a readable .npz of plain arrays", InputSpecError),
    ("calibration file with pickled objects", lambda ws: _npz(ws, ws.npz(x=np.array([{"a": 1}], dtype=object))),
     "is not a readable .npz of plain arrays (it holds pickled objects)", InputSpecError),
    ("calibration array of another name", lambda ws: _npz(ws, ws.npz(images=_x())),
     "has no array for graph input 'x' (it holds: images); save one array per input", BitfoldError),
    ("calibration array that is no input", lambda ws: _npz(ws, ws.npz(x=_x(), mask=_x())),
     "holds array 'mask', which is not a graph input; the inputs are: x.", BitfoldError),
    ("calibration arrays of different sample counts", lambda ws: _npz(ws, ws.npz(x=_x(3), mask=_x(2))),
     "must hold one array per graph input with the same number of samples on the leading axis; found {'x': 3, 'mask': 2}.", BitfoldError),
    ("calibration array of the wrong dtype", lambda ws: _npz(ws, ws.npz(x=_x(dtype=np.float64))),
     "array 'x' has dtype float64 but input 'x' is float32; cast it", BitfoldError),
    ("calibration samples of the wrong shape", lambda ws: _npz(ws, ws.npz(x=_x()[..., :8])),
     "array 'x' has samples of shape 2x3x16x8 but input x: float32[2x3x16x16]; stack the samples on a new leading axis, shape (N, 2, 3, 16, 16).", BitfoldError),
    ("calibration samples without the sample axis", lambda ws: _npz(ws, ws.npz(x=_x()[0])),
     "array 'x' has samples of shape 3x16x16 but input x: float32[2x3x16x16]; stack the samples on a new leading axis", BitfoldError),
    ("calibration samples with NaN", lambda ws: _npz(ws, ws.npz(x=np.where(np.arange(3)[:, None, None, None, None] == 2, np.nan, _x()).astype(np.float32))),
     "array 'x' holds NaN or infinite values (first in sample 2); calibration samples must be finite.", BitfoldError),
    ("unknown calibration source", lambda ws: _source(ws, "photos", ws.cnn),
     "unknown calibration source 'photos'; give an .npz file or one of: lee-text, lee-sentences, wiki-sentences, skimage-photos.", BitfoldError),
    ("text calibration for an image model", lambda ws: _source(ws, "lee-text", ws.cnn),
     "built-in calibration 'lee-text' needs a graph input 'input_ids' with a known rank; this model has none.", BitfoldError),
    ("photo calibration for a language model", lambda ws: _source(ws, "skimage-photos", ws.lm),
     "built-in calibration 'skimage-photos' feeds 3-channel NCHW images, but input 'input_ids' has shape [1, 8]", BitfoldError),
    ("calibrating pass without calibration", lambda ws: Scenario(ws.optimize(ws.lm, passes="smooth"),
                                                                  lambda: bitfold.optimize(bitfold.load(ws.lm), ["smooth"])),
     "pass 'smooth' needs calibration data", BitfoldError),
    # -- graph structure --
    ("rotate on a model without a residual stream", _rotate_on_cnn, "needs a transformer residual stream", PassPreconditionError, 2),
    # -- outputs --
    ("output in a missing folder", _missing_folder, "", None, 0),
    ("output folder is a file", lambda ws: _save(ws, ws.write("afile", b"x") / "out.onnx"), "cannot write 'ROOT/afile/out.onnx': 'ROOT/afile' is a file, not a folder; choose another output path.", BitfoldError),
    ("output is a folder", lambda ws: _save(ws, ws.root / "ext"), "output 'ROOT/ext' is a folder; give a file path, e.g. 'ROOT/ext/model.onnx'.", BitfoldError),
    ("output in a read-only folder", lambda ws: _save(ws, ws.read_only("ro") / "out.onnx"),
     "cannot write 'ROOT/ro/out.onnx': folder 'ROOT/ro' is read-only; choose a folder you can write to.", BitfoldError),
    ("report in a read-only folder", lambda ws: Scenario(ws.optimize(ws.cnn, "--report", ws.read_only("ro") / "r.json"),
                                                          lambda: write_atomic(ws.root / "ro" / "r.json", b"{}")),
     "is read-only; choose a folder you can write to.", BitfoldError),
    ("debug folder is a file", lambda ws: Scenario(["debug", ws.cnn, "-p", "remove-dead", "-o", ws.write("afile", b"x")], None),
     "output 'ROOT/afile' is a file, not a folder; give a folder path for the files bitfold writes.", BitfoldError),
    ("output is the input", lambda ws: Scenario(ws.optimize(ws.cnn, out=ws.cnn), None), "bitfold never modifies its input", BitfoldError),
    # -- Ctrl-C --
    ("Ctrl-C while saving the model", lambda ws: _ctrl_c(ws, ws.out), INTERRUPTED, KeyboardInterrupt, 130),
    ("Ctrl-C while saving over an earlier output", lambda ws: _ctrl_c(ws, ws.write("out.onnx", b"the earlier output")),
     INTERRUPTED, KeyboardInterrupt, 130),
    ("Ctrl-C while saving into a new folder", lambda ws: _ctrl_c(ws, ws.root / "new" / "sub" / "out.onnx"), INTERRUPTED, KeyboardInterrupt, 130),
    ("Ctrl-C while writing an .npz", _ctrl_c_npz, INTERRUPTED, KeyboardInterrupt, 130),
])
# fmt: on


@pytest.fixture
def ws(zoo_protos, tmp_path, monkeypatch) -> Iterator[Workspace]:
    cnn = bitfold.save(fresh(zoo_protos, "cnn-bn"), tmp_path / "cnn.onnx")
    lm = bitfold.save(fresh(zoo_protos, "tiny-lm"), tmp_path / "lm.onnx")
    bitfold.save(fresh(zoo_protos, "cnn-bn"), tmp_path / "ext" / "m.onnx", external_data=True)
    (tmp_path / "ext" / "m.onnx.data").unlink()
    yield Workspace(tmp_path, cnn, lm, monkeypatch)
    for folder in tmp_path.rglob("*"):
        if folder.is_dir():
            folder.chmod(0o755)


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root``: a folder as "dir", a file by the SHA-256 of its bytes."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))}


def _assert_untouched(ws: Workspace, before: dict[str, str], creates: tuple[Path, ...] = ()) -> None:
    after = _snapshot(ws.root)
    made = {str(p.relative_to(ws.root)) for p in creates}
    made |= {str(parent.relative_to(ws.root)) for p in creates for parent in p.parents if ws.root in parent.parents}
    assert {k: v for k, v in after.items() if k not in made} == before, "a file changed, or an output or temp file was left"
    assert made <= set(after)


@pytest.mark.parametrize("case", CASES)
def test_cli(case: Case, ws: Workspace, capsys):
    scenario = case.setup(ws)
    before = _snapshot(ws.root)
    capsys.readouterr()
    code = main([str(a) for a in scenario.argv])
    stderr = capsys.readouterr().err
    assert code == case.code, stderr
    _assert_untouched(ws, before, scenario.creates)
    if case.code == 0:
        assert all(len(bitfold.load(p).graph) == len(bitfold.load(ws.cnn).graph) for p in scenario.creates)
        return
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert case.says.replace("ROOT", str(ws.root)) in " ".join(stderr.split()), stderr
    assert lines[0].startswith("error: ") == (case.code == 2)


@pytest.mark.parametrize("case", [c for c in CASES if c.values[0].case not in CLI_ONLY])
def test_api(case: Case, ws: Workspace):
    scenario = case.setup(ws)
    before = _snapshot(ws.root)
    if case.code == 0:
        scenario.api()
        _assert_untouched(ws, before, scenario.creates)
        return
    with pytest.raises(case.error) as info:
        scenario.api()
    _assert_untouched(ws, before)
    if case.error is KeyboardInterrupt:
        return
    message = str(info.value)
    assert isinstance(info.value, BitfoldError)
    assert case.says.replace("ROOT", str(ws.root)) in message and "\n" not in message, message
