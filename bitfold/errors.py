"""User-facing errors.

Every mistake a user can make (a missing file, a bad recipe, an unknown pass, inputs of the wrong shape) raises a
subclass of :class:`BitfoldError` whose message is one sentence naming what is wrong, where, and how to fix it. The
CLI prints that sentence without a traceback and exits with code 2; any other exception is an internal bug.
"""

from __future__ import annotations


class BitfoldError(Exception):
    """A problem with what the user supplied, reported as one clear sentence."""


class ModelFileError(BitfoldError):
    """A model file is missing, unreadable, truncated, or not ONNX."""


class RecipeError(BitfoldError):
    """A recipe is malformed: bad TOML, unknown pass, or an invalid parameter."""


class UnknownPassError(RecipeError):
    """A recipe names a pass that is not registered."""


class PassParameterError(RecipeError):
    """A pass was given a parameter it does not have, or a value of the wrong type or range."""


class InputSpecError(BitfoldError):
    """Inputs fed to a model do not match its graph inputs (name, shape or dtype)."""


class ExportError(BitfoldError):
    """A PyTorch module could not be located or exported."""


class VerificationError(BitfoldError):
    """A pass broke the model: it no longer passes the ONNX checker or fails to run."""


class PassPreconditionError(BitfoldError):
    """A pass was asked to run on a model that lacks the structure it rewrites (e.g. rotate without a residual stream)."""
