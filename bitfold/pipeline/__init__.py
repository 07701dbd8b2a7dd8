"""Recipes and the pass manager that runs them."""

from bitfold.pipeline.instrument import PassContractError, run_pass
from bitfold.pipeline.manager import Pipeline, optimize
from bitfold.pipeline.recipe import Recipe, Step
from bitfold.pipeline.report import OutputError, PassRecord, PipelineReport

__all__ = ["OutputError", "PassContractError", "PassRecord", "Pipeline", "PipelineReport", "Recipe", "Step", "optimize", "run_pass"]
