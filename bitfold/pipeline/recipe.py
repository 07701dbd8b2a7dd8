"""Recipes: an ordered list of named passes with parameters, from TOML or Python, round-tripping to TOML.

TOML form::

    [[pass]]
    name = "fold-batchnorm"

    [[pass]]
    name = "fold-constants"
    input_size_limit = 4096

    [[pass]]
    name = "quantize-weights"
    bits = 4
    max_error = 0.05     # any pass with exclude globs: the exclusion loop leaves layers float to meet it

Python form: ``Recipe.from_list(["fold-batchnorm", {"name": "fold-constants", "input_size_limit": 4096}])``.
Every step is validated when the recipe is built: unknown passes and bad parameters fail before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import tomli_w

from bitfold.errors import RecipeError
from bitfold.passes import registry


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: Run through the exclusion loop: layers stay float until the graph outputs' relative L2 error against this
    #: step's input is at most this (``bitfold.tools.exclude``). Only for passes that take ``exclude`` globs.
    max_error: float | None = None

    def __post_init__(self) -> None:
        for key, value in self.params.items():
            for item in value if isinstance(value, list | tuple) else (value,):
                if isinstance(item, float) and not math.isfinite(item):
                    raise RecipeError(f"parameter '{key}' of pass '{self.name}' is {item}; give a finite number.")
        if self.max_error is None:
            return
        if isinstance(self.max_error, bool) or not isinstance(self.max_error, int | float) or not 0 < self.max_error < math.inf:
            raise RecipeError(f"pass '{self.name}': max_error must be a positive finite number, got {self.max_error!r}.")
        if not any(f.name == "exclude" for f in dataclasses.fields(registry.get_pass(self.name).Config)):
            raise RecipeError(f"pass '{self.name}' takes no exclude globs, so max_error (the exclusion loop) cannot apply to it.")

    def build(self, calibration: Any = None) -> registry.BitfoldPass:
        """The pass, constructed with ``calibration`` (its declared constructor argument)."""
        return registry.create(self.name, self.params, calibration=calibration)

    def to_dict(self) -> dict[str, Any]:
        extra = {"max_error": self.max_error} if self.max_error is not None else {}
        return {"name": self.name, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()}, **extra}


@dataclasses.dataclass(frozen=True)
class Recipe:
    steps: tuple[Step, ...]

    def __post_init__(self) -> None:
        for step in self.steps:
            step.build()  # validates pass name and parameters now, not halfway through a run

    @classmethod
    def from_list(cls, items: Iterable[str | Mapping[str, Any]]) -> Recipe:
        steps = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                steps.append(Step(item))
            elif isinstance(item, Mapping):
                params = dict(item)
                name = params.pop("name", None)
                if not isinstance(name, str):
                    raise RecipeError(f"recipe step {i + 1} has no 'name'; every [[pass]] needs name = \"<pass>\".")
                registry.get_pass(name)  # an unknown name fails here, with its did-you-mean
                steps.append(Step(name, params, params.pop("max_error", None)))
            else:
                raise RecipeError(f"recipe step {i + 1} must be a pass name or a table, got {type(item).__name__}.")
        if not steps:
            raise RecipeError("the recipe has no passes; add at least one [[pass]] table.")
        return cls(tuple(steps))

    @classmethod
    def from_names(cls, text: str) -> Recipe:
        """From a comma-separated list of pass names (the CLI's ``-p``)."""
        return cls.from_list([n.strip() for n in text.split(",") if n.strip()])

    @classmethod
    def from_toml(cls, text: str, *, source: str = "<recipe>") -> Recipe:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"recipe '{source}' is not valid TOML: {e}; fix the syntax there.") from None
        extra = set(data) - {"pass"}
        if extra:
            raise RecipeError(f"recipe '{source}' has unknown top-level key '{sorted(extra)[0]}'; only [[pass]] tables are allowed.")
        passes = data.get("pass")
        if not isinstance(passes, list):
            raise RecipeError(f"recipe '{source}' has no [[pass]] tables; add one per pass, each with name = \"...\".")
        return cls.from_list(passes)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RecipeError(f"recipe file '{path}' does not exist; check the path.") from None
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError(f"recipe file '{path}' cannot be read: {e}.") from None
        return cls.from_toml(text, source=str(path))

    def build(self, calibration: Any = None) -> list[registry.BitfoldPass]:
        """Every step's pass, each constructed with ``calibration``."""
        return [step.build(calibration) for step in self.steps]

    def to_list(self) -> list[dict[str, Any]]:
        return [step.to_dict() for step in self.steps]

    def to_toml(self) -> str:
        return tomli_w.dumps({"pass": self.to_list()})
