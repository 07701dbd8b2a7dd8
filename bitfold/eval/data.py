"""Offline evaluation and calibration data, located inside installed packages (never downloaded at run time).

- text: gensim's Lee background corpus (``test/test_data/lee_background.cor``, 300 news paragraphs), found via
  ``importlib.util.find_spec`` without importing gensim;
- images: scikit-image's bundled photos (``skimage.data``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from bitfold.errors import BitfoldError


def lee_corpus_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise BitfoldError("the Lee corpus comes with gensim; run `pip install --no-deps gensim`.")
    path = Path(spec.submodule_search_locations[0]) / "test" / "test_data" / "lee_background.cor"
    if not path.is_file():
        raise BitfoldError(f"gensim is installed but '{path}' is missing; reinstall gensim.")
    return path


def lee_text() -> str:
    return lee_corpus_path().read_text(encoding="utf-8")
