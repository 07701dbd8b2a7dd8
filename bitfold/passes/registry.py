"""The pass registry and the base class every bitfold pass derives from.

A bitfold pass is a plain ``onnx_ir.passes.InPlacePass``: it can run under ``onnx_ir.passes.PassManager`` with no
bitfold machinery around it. What bitfold adds is a registered kebab-case ``name``, a ``family``, a frozen
dataclass ``Config`` of typed parameters (validated on construction, errors name the field and the fix), and a
``rewrite`` method that returns how many rewrites it made, so ``modified`` is counted rather than assumed.

A pass that reads activation statistics (``needs_calibration``) takes its data as the declared constructor argument
``calibration``: a :class:`~bitfold.quant.calibration.CalibrationData`, or any iterable of feed dicts (graph input
name → array), which is wrapped in one. Run without it, such a pass raises :class:`~bitfold.errors.BitfoldError`
naming the argument::

    ir.passes.PassManager([Smooth(alpha=0.5, calibration=[{"input_ids": ids}, ...])])(model)
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from abc import abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

import onnx_ir as ir

from bitfold.errors import BitfoldError, PassParameterError, UnknownPassError
from bitfold.quant.calibration import CalibrationData

PASS_KEY = "bitfold.pass"
FROM_KEY = "bitfold.from"
#: Node metadata pinning a node's precision; ``"float32"`` (a low-rank branch, an inserted rotation, a cast-precision
#: island) makes quantizers and cast-precision leave the node alone.
ISLAND_KEY = "bitfold.precision"
#: Node metadata marking a layer whose weight a quantizer already rewrote (the value names the format); every
#: weight pass leaves such a node alone.
QUANTIZED_KEY = "bitfold.quantized"


@dataclasses.dataclass(frozen=True)
class NoConfig:
    """A pass without parameters."""


class BitfoldPass(ir.passes.InPlacePass):
    """Base class: subclasses set ``name``, ``family``, ``Config`` and implement ``rewrite``."""

    name: ClassVar[str]
    family: ClassVar[str]
    Config: ClassVar[type] = NoConfig
    #: True for passes that read activation statistics: they then need the ``calibration`` constructor argument.
    needs_calibration: ClassVar[bool] = False

    def __init__(
        self,
        config: Any = None,
        /,
        *,
        calibration: CalibrationData | Iterable[Mapping[str, Any]] | None = None,
        **params: Any,
    ) -> None:
        super().__init__()
        if config is not None and params:
            raise TypeError("pass either a Config instance or keyword parameters, not both")
        self.config = config if config is not None else make_config(self.name, self.Config, params)
        #: The calibration samples and their statistics (``None`` for a pass constructed without them).
        self.calibration = as_calibration(calibration, f"argument 'calibration' of pass '{self.name}'")
        #: Sentences on what the last run left alone and why (unsupported structure); the pipeline reports them.
        self.notes: list[str] = []

    @property
    def holds_whole_model(self) -> str | None:
        """Why this pass, as configured, needs every weight at once (a sentence), or None when it works weight by
        weight or block by block, so that under streaming (``optimize --stream``) its memory follows one of those.
        By default a calibrated pass holds the model: its statistics come from a run of the whole graph."""
        if self.needs_calibration:
            return "its calibration runs the whole graph in ONNX Runtime, which holds every weight"
        return None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.needs_calibration and self.calibration is None:
            raise BitfoldError(
                f"pass '{self.name}' needs calibration data, but was constructed without the 'calibration' argument; "
                f"construct it with calibration=CalibrationData(...) or a list of feed dicts."
            )
        self.notes = []
        count = self.rewrite(model)
        return ir.passes.PassResult(model, modified=count > 0)

    @abstractmethod
    def rewrite(self, model: ir.Model) -> int:
        """Rewrite ``model`` in place and return the number of rewrites made."""

    def stamp(self, node: ir.Node, sources: Iterable[ir.Node | str]) -> ir.Node:
        """Record on ``node`` that this pass created it from ``sources`` (nodes or node names)."""
        return stamp(node, self.name, sources)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def as_calibration(calibration: Any, where: str = "argument 'calibration'") -> CalibrationData | None:
    """``calibration`` as a :class:`CalibrationData`: kept when it is one, wrapped when it is an iterable of feed
    dicts (or a callable returning one); ``where`` names the argument in the error for anything else. An object
    with its own ``collect`` (the statistics interface of :class:`CalibrationData`) is kept as it is."""
    if calibration is None or isinstance(calibration, CalibrationData) or hasattr(calibration, "collect"):
        return calibration
    if isinstance(calibration, str | bytes | Mapping) or not (callable(calibration) or isinstance(calibration, Iterable)):
        raise BitfoldError(
            f"{where} must be a CalibrationData or an iterable of feed dicts, "
            f"got {type(calibration).__name__}; for a built-in source use CalibrationData.from_source(name, model)."
        )
    return CalibrationData(list(calibration) if isinstance(calibration, Iterator) else calibration)


def stamp(node: ir.Node, pass_name: str, sources: Iterable[ir.Node | str]) -> ir.Node:
    names = [s if isinstance(s, str) else (s.name or s.op_type) for s in sources]
    node.metadata_props[PASS_KEY] = pass_name
    node.metadata_props[FROM_KEY] = ",".join(names)
    return node


_REGISTRY: dict[str, type[BitfoldPass]] = {}


def register(cls: type[BitfoldPass]) -> type[BitfoldPass]:
    """Class decorator adding a pass to the registry under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass name {cls.name!r} is registered twice")
    if not dataclasses.is_dataclass(cls.Config):
        raise TypeError(f"{cls.__name__}.Config must be a dataclass")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[BitfoldPass]]:
    """All registered passes by name, in family then name order."""
    return dict(sorted(_REGISTRY.items(), key=lambda item: (item[1].family, item[0])))


def get_pass(name: str) -> type[BitfoldPass]:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "run `bitfold passes` for the list."
        raise UnknownPassError(f"unknown pass '{name}'; {hint}") from None


def create(name: str, params: Mapping[str, Any] | None = None, *, calibration: Any = None) -> BitfoldPass:
    """Instantiate the registered pass ``name`` with validated ``params`` (and ``calibration``, see the module doc)."""
    cls = get_pass(name)
    return cls(make_config(name, cls.Config, dict(params or {})), calibration=calibration)


def describe(cls: type[BitfoldPass]) -> dict[str, Any]:
    """Name, family, one-line doc and parameters (type, default, doc) of a pass, JSON-ready."""
    hints = typing.get_type_hints(cls.Config)
    params = []
    for f in dataclasses.fields(cls.Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        params.append(
            {
                "name": f.name,
                "type": _type_name(hints[f.name]),
                "default": list(default) if isinstance(default, tuple) else default,
                "doc": f.metadata.get("doc", ""),
            }
        )
    doc = (cls.__doc__ or "").strip().splitlines()
    return {"name": cls.name, "family": cls.family, "doc": doc[0] if doc else "", "params": params}


def make_config(pass_name: str, config_cls: type, params: dict[str, Any]) -> Any:
    """Build ``config_cls`` from user ``params``, checking names and types; errors name the field and the fix."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    values = {}
    for key, value in params.items():
        if key not in fields:
            if not fields:
                raise PassParameterError(f"pass '{pass_name}' takes no parameters; remove '{key}'.")
            raise PassParameterError(f"pass '{pass_name}' has no parameter '{key}'; its parameters are: {', '.join(sorted(fields))}.")
        values[key] = _coerce(pass_name, key, hints[key], value)
    try:
        return config_cls(**values)
    except ValueError as e:
        raise PassParameterError(f"pass '{pass_name}': {str(e).rstrip('.')}.") from e


def _coerce(pass_name: str, key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    where = f"parameter '{key}' of pass '{pass_name}'"
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            options = " | ".join(repr(c) for c in choices)
            raise PassParameterError(f"{where} must be one of {options}, got {value!r}.")
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise PassParameterError(f"{where} must be a list, got {value!r}.")
        item = typing.get_args(hint)[0]
        return tuple(_coerce(pass_name, key, item, v) for v in value)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        return _coerce(pass_name, key, next(a for a in args if a is not type(None)), value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise PassParameterError(f"{where} must be of type {hint.__name__}, got {value!r}.")
    return value


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return " | ".join(repr(c) for c in typing.get_args(hint))
    if origin is tuple:
        return f"list[{_type_name(typing.get_args(hint)[0])}]"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))
