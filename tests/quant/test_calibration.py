from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import fresh

import bitfold
from bitfold.errors import BitfoldError
from bitfold.quant.calibration import CalibrationData, model_key


def _samples(n=10, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 32)).astype(np.float32) * 3} for _ in range(n)]


def test_streamed_statistics_match_numpy_on_all_activations(zoo_protos):
    model = fresh(zoo_protos, "mlp")
    samples = _samples()
    relu = next(n for n in model.graph if n.op_type == "Relu").outputs[0].name
    stats = CalibrationData(samples).collect(model, ["x", relu], gram=["x", relu], progress=False)
    xs = np.concatenate([s["x"] for s in samples])
    s = stats["x"]
    assert s.min == xs.min() and s.max == xs.max() and s.rows == 40
    np.testing.assert_allclose(s.absmax, np.abs(xs).max(0))
    np.testing.assert_allclose(s.mean_abs, np.abs(xs).mean(0), rtol=1e-6)
    np.testing.assert_allclose(s.gram, xs.astype(np.float64).T @ xs, rtol=1e-9)
    assert s.percentile(100) == pytest.approx(np.abs(xs).max())
    assert stats[relu].min >= 0 and stats[relu].gram.shape == (64, 64)


def test_sink_weight_scales_the_first_row_of_each_sequence(zoo_protos):
    model = fresh(zoo_protos, "decoder-rmsnorm-swiglu-rope")
    rng = np.random.default_rng(1)
    samples = [{"x": rng.standard_normal((1, 8, 32)).astype(np.float32)} for _ in range(3)]
    plain = CalibrationData(samples).collect(model, ["x"], gram=["x"], progress=False)["x"].gram
    weighted = CalibrationData(samples).collect(model, ["x"], gram=["x"], sink_weight=5.0, progress=False)["x"].gram
    firsts = np.stack([s["x"][0, 0] for s in samples]).astype(np.float64)
    np.testing.assert_allclose(weighted - plain, 4.0 * firsts.T @ firsts, rtol=1e-9, atol=1e-9)


def test_npz_source_and_errors(zoo_protos, tmp_path):
    model = fresh(zoo_protos, "mlp")
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.stack([s["x"] for s in _samples(5)]))
    data = CalibrationData.from_source(str(path), model)
    assert len(data) == 5 and next(iter(data))["x"].shape == (4, 32)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((5, 4, 32), np.float32), y=np.zeros((3, 2), np.float32))
    with pytest.raises(BitfoldError, match="same number of samples"):
        CalibrationData.from_npz(bad)
    with pytest.raises(BitfoldError, match="unknown calibration source 'imagenet'"):
        CalibrationData.from_source("imagenet", model)
    with pytest.raises(BitfoldError, match="does not compute"):
        data.collect(model, ["nope"], progress=False)
    with pytest.raises(BitfoldError, match="yields no samples"):
        CalibrationData([]).collect(model, ["x"], progress=False)


def test_model_key_follows_a_changed_weight_and_the_statistics_are_not_reused(zoo_protos):
    model = fresh(zoo_protos, "mlp")
    data = CalibrationData(_samples(4))
    first = data.collect(model, ["relu"], progress=False)
    assert data.collect(model, ["relu"], progress=False) is first  # same graph, same request: reused
    assert data.collect(bitfold.clone(model), ["relu"], progress=False) is first  # an identical copy: reused
    weight = model.graph.initializers["net.0.weight"]
    changed = weight.const_value.numpy().copy()
    changed.flat[7] += 1.0  # one element, off the sampled stride
    key = model_key(model)
    weight.const_value = ir.tensor(changed)  # a pass replaces the tensor
    assert model_key(model) != key
    second = data.collect(model, ["relu"], progress=False)
    assert second is not first
    recomputed = CalibrationData(_samples(4)).collect(model, ["relu"], progress=False)
    np.testing.assert_array_equal(second["relu"].sum, recomputed["relu"].sum)
    assert not np.array_equal(second["relu"].sum, first["relu"].sum)
    key = model_key(model)
    weight.const_value.numpy()[...] *= 2.0  # edited in place through its numpy array
    assert model_key(model) != key
    assert data.collect(model, ["relu"], progress=False) is not second


def test_model_key_reads_no_serialized_model_and_hashes_each_tensor_once(zoo_protos, monkeypatch):
    import bitfold.quant.calibration as calibration

    model = fresh(zoo_protos, "tiny-lm")
    hashed = []
    content_digest = calibration._content_digest
    monkeypatch.setattr(calibration, "_content_digest", lambda t: hashed.append(t) or content_digest(t))
    monkeypatch.setattr(ir, "to_proto", lambda *a, **k: pytest.fail("model_key serialized the model"))
    key = model_key(model)
    tensors = len(hashed)  # initializers and Constant nodes' tensors, once each
    assert tensors >= len(model.graph.initializers) and len({id(t) for t in hashed}) == tensors
    assert model_key(model) == key and len(hashed) == tensors  # nothing hashed again
    model.graph.node(0).name = "renamed"
    assert model_key(model) != key and len(hashed) == tensors


def _dynamic_image_model() -> ir.Model:
    """images [batch, 3, height, width] -> Conv -> GlobalAveragePool."""
    images = ir.val("images", ir.DataType.FLOAT, ["batch", 3, "height", "width"])
    w = ir.Value(name="w", const_value=ir.tensor(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)))
    conv = ir.node("Conv", [images, w], attributes={"pads": [1, 1, 1, 1]}, name="conv")
    pool = ir.node("GlobalAveragePool", [conv.outputs[0]], name="pool")
    pool.outputs[0].name, pool.outputs[0].dtype = "y", ir.DataType.FLOAT
    graph = ir.Graph([images], [pool.outputs[0]], nodes=[conv, pool], initializers=[w], opset_imports={"": 17})
    return ir.Model(graph, ir_version=9)


def test_photo_source_takes_the_given_shape_for_a_dynamic_image_size():
    model = _dynamic_image_model()
    with pytest.raises(BitfoldError, match=r"axis 2 \('height'\) is symbolic; give its shape \(CLI: --shape images=BATCHx3xHEIGHTxWIDTH"):
        CalibrationData.from_source("skimage-photos", model)
    data = CalibrationData.from_source("skimage-photos", model, shapes={"images": (1, 3, 32, 32)})
    samples = list(data)
    assert len(samples) == 96 and all(s["images"].shape == (1, 3, 32, 32) for s in samples)
    stats = data.collect(model, ["y"], progress=False)
    assert stats["y"].rows == 96 * 4 and np.isfinite(stats["y"].absmax).all()
    wide = list(CalibrationData.from_source("skimage-photos", model, shapes={"images": (2, 3, 24, 40)}))
    assert len(wide) == 48 and all(s["images"].shape == (2, 3, 24, 40) and s["images"].dtype == np.float32 for s in wide)
    with pytest.raises(BitfoldError, match="has 4 at axis 1, where the graph fixes 3"):
        CalibrationData.from_source("skimage-photos", model, shapes={"images": (1, 4, 32, 32)})


def _word_tokenizer(folder=None):
    """A 96-token word-level tokenizer over the commonest words of the Lee corpus (the tiny LMs' vocabulary size)."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from bitfold.eval.data import lee_text

    words = [w for w, _ in Counter(lee_text().split()).most_common(95)]
    core = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer


def test_lee_text_uses_the_tokenizer_beside_the_model(zoo_protos, tmp_path):
    from bitfold.eval.data import lee_text
    from bitfold.eval.tasks import CALIB_WINDOWS

    tokenizer = _word_tokenizer(tmp_path)
    bitfold.save(fresh(zoo_protos, "tiny-lm"), tmp_path / "model.onnx", external_data=True)
    model = bitfold.load(tmp_path / "model.onnx")
    samples = list(CalibrationData.from_source("lee-text", model))
    ids = np.asarray(tokenizer(lee_text(), add_special_tokens=False)["input_ids"])
    first = CALIB_WINDOWS.start * 8  # the graph's input_ids are (1, 8)
    assert len(samples) == len(CALIB_WINDOWS)
    np.testing.assert_array_equal(samples[0]["input_ids"][0], ids[first : first + 8])
    in_memory = fresh(zoo_protos, "tiny-lm")  # no external data: the folder is named
    for given in ({"tokenizer": tmp_path}, {"tokenizer": tokenizer}, {"model_dir": tmp_path}):
        again = list(CalibrationData.from_source("lee-text", in_memory, **given))
        np.testing.assert_array_equal(again[0]["input_ids"], samples[0]["input_ids"])


def test_wiki_sentences_are_prose_and_the_source_spreads_1024_of_them(zoo_protos):
    from bitfold.eval.data import lee_sentences, wiki_sentences

    sentences = wiki_sentences()
    assert len(sentences) > 10_000
    assert all(6 <= len(s.split()) <= 60 and s[-1] in ".!?" for s in sentences)
    assert not [s for s in sentences if any(m in s for m in ("[[", "]]", "{{", "}}", "<ref", "|", "''", "File:"))]
    assert not set(sentences) & set(lee_sentences("test"))  # the evaluation sentences are not in the training text
    tokenizer = _word_tokenizer()
    tokenizer.pad_token = "[UNK]"
    samples = list(CalibrationData.from_source("wiki-sentences", fresh(zoo_protos, "tiny-lm"), tokenizer=tokenizer))
    assert len(samples) == 1024 and samples[0]["input_ids"].shape == (1, 8)
    assert len({s["input_ids"].tobytes() for s in samples}) > 900  # 8 tokens of a 96-word vocabulary: a few coincide


class _SizedTokenizer:
    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


def test_lee_text_refuses_a_tokenizer_whose_vocabulary_does_not_match(zoo_protos, tmp_path, monkeypatch):
    import bitfold.eval.calibration as calibration  # the built-in sources live with the evaluation data

    model = fresh(zoo_protos, "tiny-lm")  # vocabulary 96, no tokenizer files known
    monkeypatch.setattr(calibration, "_source_tokenizer", lambda source: ("SmolLM2", _SizedTokenizer(49152)))
    with pytest.raises(BitfoldError, match=r"tokenizes with SmolLM2's tokenizer \(49152 tokens\), but the model's vocabulary has 96 entries; pass the model's own tokenizer"):
        CalibrationData.from_source("lee-text", model)
    with pytest.raises(BitfoldError, match="has 200 tokens but the model's vocabulary has 96"):
        CalibrationData.from_source("lee-text", model, tokenizer=_SizedTokenizer(200))
    with pytest.raises(BitfoldError, match="argument 'tokenizer': .* holds no tokenizer files"):
        CalibrationData.from_source("lee-text", model, tokenizer=tmp_path)
    monkeypatch.setattr(calibration, "_source_tokenizer", lambda source: ("SmolLM2", _word_tokenizer()))
    assert len(CalibrationData.from_source("lee-text", model)) == 32  # the source's tokenizer fits: accepted


def test_a_request_larger_than_one_run_exposes_is_sliced_with_identical_statistics(zoo_protos, monkeypatch):
    """Every float tensor of a decoder, collected in one run and in slices of 3 (several passes over the data)."""
    from bitfold.quant import calibration

    model = fresh(zoo_protos, "decoder-rmsnorm-swiglu-rope")
    names = [v.name for n in model.graph for v in n.outputs if v.dtype == ir.DataType.FLOAT]
    rng = np.random.default_rng(2)
    samples = [{"x": rng.standard_normal((1, 8, 32)).astype(np.float32)} for _ in range(3)]
    whole = CalibrationData(samples).collect(model, names, gram=names[:4], progress=False)
    runs = []
    original = calibration.session
    monkeypatch.setattr(calibration, "session", lambda probe: runs.append(len(probe.graph.outputs)) or original(probe))
    monkeypatch.setattr(calibration, "EXPOSED_PER_RUN", 3)
    sliced = CalibrationData(samples).collect(model, names, gram=names[:4], progress=False)
    assert len(runs) == -(-len(names) // 3) and max(runs) <= 3 + len(model.graph.outputs)
    for name in names:  # exposing other tensors changes ORT's fusions: fp32 reordering, not different statistics
        a, b = whole[name], sliced[name]
        assert a.rows == b.rows
        np.testing.assert_allclose([a.min, a.max], [b.min, b.max], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.absmax, b.absmax, rtol=1e-5, atol=1e-6)
        if a.gram is not None:
            np.testing.assert_allclose(a.gram, b.gram, rtol=1e-5, atol=1e-6)


def test_samples_are_uniform_over_every_update():
    """Ten updates of 100 rows into a 100-row sample: each update's rows are kept with probability 1/10. Merging by
    resampling the pooled sample instead keeps the last update's rows with probability 1/2 and the first's ~0."""
    from bitfold.quant.calibration import TensorStats

    kept = np.zeros(10)
    for seed in range(300):
        stats, rng = TensorStats(), np.random.default_rng(seed)
        for update in range(10):
            rows = np.full((100, 2), update, np.float32)
            stats.update(rows, gram=False, reservoir=50, rng=rng, rows_kept=100)
        kept += np.bincount(stats.sample[:, 0].astype(int), minlength=10) / 100
    np.testing.assert_allclose(kept / 300, 0.1, atol=0.01)


def test_samples_do_not_depend_on_names_or_on_the_other_tensors_of_the_run(zoo_protos):
    """A graph's samples of one tensor are the same whether it is collected alone or with others; two graphs that
    compute the same values under different names (a KV-cache export and a traced one) sample the same rows."""
    model = fresh(zoo_protos, "decoder-rmsnorm-swiglu-rope")
    names = [v.name for n in model.graph for v in n.outputs if v.dtype == ir.DataType.FLOAT]
    rng = np.random.default_rng(3)
    samples = [{"x": rng.standard_normal((1, 8, 32)).astype(np.float32)} for _ in range(40)]
    target = names[len(names) // 2]
    alone = CalibrationData(samples).collect(model, [target], rows=[target], rows_kept=100, reservoir=1000, progress=False)
    crowd = CalibrationData(samples).collect(model, names[::-1], rows=names, rows_kept=100, reservoir=1000, progress=False)
    np.testing.assert_array_equal(alone[target].sample, crowd[target].sample)
    np.testing.assert_array_equal(alone[target].reservoir, crowd[target].reservoir)
    assert len(alone[target].sample) == 100 and len(alone[target].reservoir) == 1000


def test_photo_splits_share_no_photo_and_the_validation_photo_loads():
    pytest.importorskip("skimage")
    from bitfold.eval.data import CALIB_PHOTOS, EVAL_PHOTOS, VALID_PHOTOS, photo_crops

    assert not (set(EVAL_PHOTOS) & set(CALIB_PHOTOS) or set(VALID_PHOTOS) & (set(EVAL_PHOTOS) | set(CALIB_PHOTOS)))
    crops = photo_crops("validation", 3, size=32)
    assert crops.shape == (3, 3, 32, 32) and crops.dtype == np.float32
    assert len({c.tobytes() for c in crops}) == 3 and 0.3 < crops.std() < 3  # distinct crops, ImageNet-normalized
    with pytest.raises(KeyError):
        photo_crops("test", 1)


def test_gram_accumulated_in_place_is_the_sum_bit_for_bit():
    """A Gram matrix wider than the row blocks sink_gram works in, added to in place: the same bits as the sum of
    the separate matrices (first token of each sequence weighted)."""
    from bitfold.quant.calibration import sink_gram

    rng = np.random.default_rng(0)
    first, second = (rng.standard_normal((2, 16, 1100)).astype(np.float32) for _ in range(2))
    expected = sink_gram(first, 64.0) + sink_gram(second, 64.0)
    gram = sink_gram(first, 64.0)
    assert sink_gram(second, 64.0, into=gram) is gram
    np.testing.assert_array_equal(gram, expected)
    rows = first.reshape(-1, 1100).astype(np.float64)
    weights = np.where(np.arange(32) % 16 == 0, 64.0, 1.0)
    np.testing.assert_allclose(sink_gram(first, 64.0), (rows * weights[:, None]).T @ rows, rtol=1e-12)
