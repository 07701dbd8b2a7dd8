"""Offline evaluation and calibration data, located inside installed packages (never downloaded at run time).

- text: gensim's Lee background corpus (``test/test_data/lee_background.cor``, 300 news paragraphs), found via
  ``importlib.util.find_spec`` without importing gensim, and its test corpus (``lee.cor``, 50 other documents),
  the held-out text; gensim's Wikipedia sample (the first ~200 articles of an English dump, shortened), a training
  set for distillation that no evaluation reads;
- images: scikit-image's bundled photos (``skimage.data``), split into evaluation and calibration photos.
"""

from __future__ import annotations

import bz2
import importlib.util
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

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


def lee_test_text() -> str:
    """The Lee test corpus (``lee.cor``: 50 news documents, none of them in the background corpus), the held-out
    text language models are also scored on. The file is Latin-1."""
    return lee_corpus_path().with_name("lee.cor").read_bytes().decode("latin-1")


def lee_sentences(split: str) -> list[str]:
    """Sentences of the Lee test corpus (``lee.cor``, evaluation) or of the background corpus (calibration)."""
    path = lee_corpus_path() if split == "calibration" else lee_corpus_path().with_name("lee.cor")
    text = path.read_text(encoding="utf-8", errors="replace")
    sentences = [s.strip() for line in text.splitlines() for s in line.replace("? ", ". ").split(". ")]
    return [s for s in sentences if len(s.split()) >= 4]


WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_MARKUP = [  # wiki markup, removed in this order: templates and tables, references, files, links, formatting
    (re.compile(r"\{\{[^{}]*\}\}"), ""),
    (re.compile(r"\{\|.*?\|\}", re.S), ""),
    (re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"</?[A-Za-z][^<>\n]*>"), ""),
    (re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\]]*(?:\[\[[^\]]*\]\][^\]]*)*\]\]"), ""),
    (re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[https?://\S+ ?([^\]]*)\]"), r"\1"),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"&[a-z]+;"), " "),
]


def wiki_sentences(limit: int | None = None) -> list[str]:
    """Sentences of gensim's Wikipedia sample (``test/test_data/{WIKI_FILE}``), markup stripped: prose lines only
    (no headings, lists or tables), sentences of 6 to 60 words, in article order."""
    path = lee_corpus_path().with_name(WIKI_FILE)
    if not path.is_file():
        raise BitfoldError(f"gensim is installed but '{path}' is missing; reinstall gensim.")
    out: list[str] = []
    with bz2.open(path) as f:
        for _, element in ET.iterparse(f):
            if not element.tag.endswith("}text") or not element.text:
                element.clear() if element.tag.endswith("}page") else None
                continue
            text = element.text
            for _ in range(3):  # nested templates, innermost first
                text = _MARKUP[0][0].sub("", text)
            for pattern, repl in _MARKUP[1:]:
                text = pattern.sub(repl, text)
            for line in text.splitlines():
                line = line.strip()
                if not line or line[0] in "=*#:;|!{}[" or line.startswith(("Category:", "thumb")):
                    continue
                for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", line):
                    if 6 <= len(sentence.split()) <= 60 and sentence[-1] in ".!?" and not any(m in sentence for m in ("]]", "|", "File:", "Image:")):
                        out.append(sentence)
                        if limit is not None and len(out) >= limit:
                            return out
            element.clear()
    return out


#: scikit-image photos by role. Evaluation and calibration never share a photo.
EVAL_PHOTOS = (
    "astronaut", "chelsea", "hubble_deep_field", "retina", "camera", "coins", "moon", "clock", "brick", "page",
)  # fmt: skip
CALIB_PHOTOS = ("coffee", "rocket", "immunohistochemistry", "stereo_motorcycle", "grass", "gravel")
#: matplotlib's sample photo, read by neither: where settings of the image benchmarks are chosen
VALID_PHOTOS = ("grace_hopper",)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _photo(name: str) -> np.ndarray:
    import skimage.data

    if name == "grace_hopper":
        import matplotlib.cbook
        import skimage.io

        image = skimage.io.imread(matplotlib.cbook.get_sample_data("grace_hopper.jpg"))
    else:
        image = getattr(skimage.data, name)()
    image = image[0] if isinstance(image, tuple) else image  # stereo pairs: the left view
    image = np.asarray(image, dtype=np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def photo_crops(split: str, per_photo: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """Deterministic crops (random scale 30–100 % of the short side, random position, random horizontal flip),
    resized to size×size, ImageNet-normalized, NCHW float32: (photos · per_photo, 3, size, size)."""
    from skimage.transform import resize

    names = {"eval": EVAL_PHOTOS, "calibration": CALIB_PHOTOS, "validation": VALID_PHOTOS}[split]
    rng = np.random.default_rng(seed)
    batch = []
    for name in names:
        image = _photo(name)
        h, w, _ = image.shape
        for _ in range(per_photo):
            side = int(min(h, w) * rng.uniform(0.3, 1.0))
            top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = image[top : top + side, left : left + side]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            crop = resize(crop, (size, size), anti_aliasing=True, preserve_range=True).astype(np.float32)
            batch.append(((crop - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1))
    return np.stack(batch).astype(np.float32)
