"""bitfold: a graph-rewriting compiler toolkit for cheap neural-network inference.

    import bitfold
    model = bitfold.load("model.onnx")
    model, report = bitfold.optimize(model, ["fold-batchnorm", "remove-dead"], verify=True)
    bitfold.save(model, "model.opt.onnx")
    print(bitfold.compile(model, backend="ort").bench(bitfold.sample_feeds(model)))
"""

from bitfold import passes
from bitfold.backends import compile
from bitfold.errors import BitfoldError
from bitfold.eval import calibration as _calibration  # noqa: F401  (registers the built-in calibration sources)
from bitfold.frontend import clone, from_torch, load, save
from bitfold.frontend.inputs import sample_feeds
from bitfold.pipeline import Pipeline, PipelineReport, Recipe, optimize

__version__ = "0.1.0"

__all__ = [
    "BitfoldError",
    "Pipeline",
    "PipelineReport",
    "Recipe",
    "clone",
    "compile",
    "from_torch",
    "load",
    "optimize",
    "passes",
    "sample_feeds",
    "save",
]
