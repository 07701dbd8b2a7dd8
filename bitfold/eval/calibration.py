"""The built-in calibration sources: ``CalibrationData.from_source(name, model)`` and ``--calibration NAME``.

| name | what it is |
|---|---|
| ``lee-text`` | windows of the Lee corpus for causal LMs (``eval.tasks.CALIB_WINDOWS``), disjoint from the windows the perplexity evaluation scores |
| ``lee-sentences`` | sentences of the Lee corpus's background set, for sentence encoders |
| ``wiki-sentences`` | 1,024 sentences spread over gensim's Wikipedia sample, for sentence encoders: a larger training set for distillation (``reconstruct`` with ``tune_weights``) |
| ``skimage-photos`` | crops of scikit-image photos, disjoint from the photos the image evaluation uses |

Each is shaped for the model's inputs: ``shapes`` sizes inputs whose dimensions are symbolic, as the CLI's
``--shape`` does (e.g. ``{"images": (1, 3, 320, 320)}``); a static dimension must agree with it. The text sources
take ``tokenizer``, a Hugging Face tokenizer or the folder of the model's tokenizer files. Without it, the tokenizer
files beside the model are used (in ``model_dir``, the folder it was loaded from, else the folder of its external
data); without those, the source's own tokenizer (SmolLM2's for ``lee-text``, all-MiniLM-L6-v2's for
``lee-sentences`` and ``wiki-sentences``), which is refused unless the model's vocabulary (the rows of the table ``input_ids`` indexes,
else the last axis of ``logits``) has exactly its size.

The sources register themselves with :func:`bitfold.quant.calibration.register_source` when this module is
imported, which ``import bitfold`` does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from bitfold.errors import BitfoldError
from bitfold.eval.data import lee_sentences, photo_crops, wiki_sentences
from bitfold.eval.tasks import CALIB_WINDOWS, WINDOW, lee_windows, lm_feeds, sentence_feeds
from bitfold.llm.builtin import smollm2_folder
from bitfold.quant.calibration import register_source


@register_source("lee-text")
def lee_text_source(model: ir.Model, *, shapes=None, tokenizer: Any = None, model_dir=None) -> list[dict[str, np.ndarray]]:
    """One prefill per calibration window of the Lee corpus, ``input_ids`` as long as the model's (default 512)."""
    seq_len = _input_dims(model, "input_ids", shapes, "lee-text", defaults={0: 1, 1: WINDOW})[1]
    tokenizer = _text_tokenizer("lee-text", model, tokenizer, model_dir)
    try:
        windows = lee_windows(tokenizer, CALIB_WINDOWS, seq_len)
    except ValueError as e:
        raise BitfoldError(f"built-in calibration 'lee-text' cannot cut its windows with this tokenizer: {e}.") from None
    return list(lm_feeds(windows, model))


@register_source("lee-sentences")
def lee_sentences_source(model: ir.Model, *, shapes=None, tokenizer: Any = None, model_dir=None) -> list[dict[str, np.ndarray]]:
    """The first 128 sentences of the Lee background corpus, padded or cut to the model's sequence length."""
    seq_len = _input_dims(model, "input_ids", shapes, "lee-sentences", defaults={0: 1})[1]
    tokenizer = _text_tokenizer("lee-sentences", model, tokenizer, model_dir)
    return sentence_feeds(tokenizer, lee_sentences("calibration")[:128], seq_len)


@register_source("wiki-sentences")
def wiki_sentences_source(model: ir.Model, *, shapes=None, tokenizer: Any = None, model_dir=None) -> list[dict[str, np.ndarray]]:
    """1,024 sentences of gensim's Wikipedia sample, evenly spaced over it, padded or cut to the model's sequence length."""
    seq_len = _input_dims(model, "input_ids", shapes, "wiki-sentences", defaults={0: 1})[1]
    tokenizer = _text_tokenizer("wiki-sentences", model, tokenizer, model_dir)
    sentences = wiki_sentences()
    return sentence_feeds(tokenizer, [sentences[i] for i in wiki_training_indices(len(sentences))], seq_len)


def wiki_training_indices(count: int) -> list[int]:
    """The ``wiki-sentences`` picks among ``count`` sentences: 1,024 evenly spaced (all of them when fewer)."""
    return sorted(set(np.linspace(0, count - 1, min(count, 1024)).round().astype(int).tolist()))


@register_source("skimage-photos")
def skimage_photos_source(model: ir.Model, *, shapes=None, tokenizer: Any = None, model_dir=None) -> list[dict[str, np.ndarray]]:
    """scikit-image calibration crops for the first graph input (NCHW, 3 channels), batched as the input is."""
    image = model.graph.inputs[0]
    dims = _input_dims(model, image.name, shapes, "skimage-photos", defaults={0: 1})
    if len(dims) != 4 or dims[1] != 3:
        raise BitfoldError(f"built-in calibration 'skimage-photos' feeds 3-channel NCHW images, but input '{image.name}' has shape {list(dims)}; give an .npz instead.")
    batch, _, height, width = dims
    crops = photo_crops("calibration", 16, size=max(height, width))
    if height != width:
        from skimage.transform import resize

        crops = np.stack([resize(c, (3, height, width), anti_aliasing=True, preserve_range=True) for c in crops]).astype(np.float32)
    if len(crops) < batch:
        raise BitfoldError(f"built-in calibration 'skimage-photos' has {len(crops)} crops, fewer than the batch of {batch} input '{image.name}' needs.")
    return [{image.name: crops[i : i + batch]} for i in range(0, len(crops) - batch + 1, batch)]


def _input_dims(model: ir.Model, input_name: str, shapes, source: str, defaults: Mapping[int, int] | None = None) -> tuple[int, ...]:
    """The dimensions of a graph input: static ones from the graph, symbolic ones from ``shapes`` (else from
    ``defaults`` by axis); refuses a symbolic dimension neither gives, or a given shape that contradicts the graph."""
    value = next((v for v in model.graph.inputs if v.name == input_name), None)
    if value is None or value.shape is None:
        raise BitfoldError(f"built-in calibration '{source}' needs a graph input '{input_name}' with a known rank; this model has none.")
    given = None if shapes is None or input_name not in shapes else tuple(int(d) for d in shapes[input_name])
    graph_dims = list(value.shape)
    if given is not None and len(given) != len(graph_dims):
        raise BitfoldError(f"the shape given for input '{input_name}' has {len(given)} dimensions but the graph input has {len(graph_dims)}; fix the shape.")
    dims = []
    for axis, dim in enumerate(graph_dims):
        if isinstance(dim, int):
            if given is not None and given[axis] != dim:
                raise BitfoldError(f"the shape given for input '{input_name}' has {given[axis]} at axis {axis}, where the graph fixes {dim}; fix the shape.")
            dims.append(dim)
        elif given is not None:
            dims.append(given[axis])
        elif defaults and axis in defaults:
            dims.append(defaults[axis])
        else:
            example = "x".join(str(d) if isinstance(d, int) else str(d).upper() for d in graph_dims)
            raise BitfoldError(
                f"built-in calibration '{source}' needs the size of input '{input_name}', whose axis {axis} ('{dim}') is symbolic; "
                f"give its shape (CLI: --shape {input_name}={example}; Python: shapes={{'{input_name}': (...)}})."
            )
    return tuple(dims)


#: Tokenizer files whose presence beside a model marks its tokenizer folder.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _text_tokenizer(source: str, model: ir.Model, tokenizer: Any, model_dir: str | os.PathLike | None):
    """The tokenizer a text source uses for ``model`` (see the module docstring)."""
    folder = Path(tokenizer) if isinstance(tokenizer, str | os.PathLike) else None
    if folder is None and tokenizer is None:
        beside = Path(model_dir) if model_dir is not None else _model_folder(model)
        folder = beside if beside is not None and any((beside / f).is_file() for f in _TOKENIZER_FILES) else None
    vocab = _vocab_size(model)
    if folder is not None:
        if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
            raise BitfoldError(f"argument 'tokenizer': '{folder}' holds no tokenizer files ({' or '.join(_TOKENIZER_FILES)}); pass the folder of the model's tokenizer.")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer is not None:
        if vocab is not None and len(tokenizer) > vocab:
            raise BitfoldError(
                f"the tokenizer for calibration '{source}' has {len(tokenizer)} tokens but the model's vocabulary has {vocab}; "
                f"pass the tokenizer the model was trained with."
            )
        return tokenizer
    own, tokenizer = _source_tokenizer(source)
    if vocab != len(tokenizer):
        has = f"has {vocab} entries" if vocab is not None else "cannot be read from the graph (no Gather of 'input_ids' from a constant table, no static 'logits')"
        raise BitfoldError(
            f"built-in calibration '{source}' tokenizes with {own}'s tokenizer ({len(tokenizer)} tokens), but the model's vocabulary {has}; "
            f"pass the model's own tokenizer (tokenizer=<folder of its tokenizer files>, found by itself beside an exported model) or an .npz of token ids."
        )
    return tokenizer


def _source_tokenizer(source: str) -> tuple[str, Any]:
    """(model name, tokenizer) of the model a built-in text source was made for."""
    if source == "lee-text":
        from transformers import AutoTokenizer

        return "SmolLM2", AutoTokenizer.from_pretrained(smollm2_folder())
    from bitfold.eval.models import minilm

    return "all-MiniLM-L6-v2", minilm()[1]


def _model_folder(model: ir.Model) -> Path | None:
    """The folder of a model loaded from a file with external data (where its tokenizer files would be)."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and tensor.base_dir:
            return Path(tensor.base_dir)
    return None


def _vocab_size(model: ir.Model) -> int | None:
    """Rows of the constant table ``input_ids`` indexes (through Cast/Identity), else the static last axis of the
    ``logits`` output; ``None`` when the graph tells neither."""
    frontier = [v for v in model.graph.inputs if v.name == "input_ids"]
    while frontier:
        value = frontier.pop()
        for use in value.uses():
            node = use.node
            if node.op_type in ("Cast", "Identity"):
                frontier.extend(node.outputs)
            elif node.op_type == "Gather" and use.idx == 1 and node.inputs[0] is not None:
                table = node.inputs[0]
                axis = node.attributes.get_int("axis", 0)
                shape = table.const_value.shape if table.const_value is not None else table.shape
                if shape is not None and axis == 0 and isinstance(shape[0], int):
                    return shape[0]
    for value in model.graph.outputs:
        if value.name == "logits" and value.shape is not None and len(value.shape) and isinstance(value.shape[-1], int):
            return value.shape[-1]
    return None
