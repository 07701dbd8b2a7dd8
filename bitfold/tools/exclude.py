"""The exclusion loop under its tools name: :func:`keep_within` lives in :mod:`bitfold.pipeline.exclude`, where the
pass manager runs it for a recipe step's ``max_error``."""

from bitfold.pipeline.exclude import Kept, keep_within

__all__ = ["Kept", "keep_within"]
