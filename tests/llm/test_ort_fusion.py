"""The ORT lowering of KV-cache graphs (GroupQueryAttention, fused residual norms, packed QKV, last-position head)
computes what the standard graph computes, on every family, float and quantized."""

from __future__ import annotations

import numpy as np
import pytest

from tests.llm.families import FAMILIES, make

pytest.importorskip("transformers")


def _steps(model, fuse: bool, prompt, tokens, max_length: int = 48):
    from bitfold.llm.generate import Decoder

    decoder = Decoder(model, max_length=max_length, fuse=fuse)
    return decoder, [decoder(prompt)] + [decoder(np.asarray([t])) for t in tokens]


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _lowered_matches(model, reference, seed: int, tolerance: float = 1e-4):
    """The lowered decoder of ``model`` against the standard graph of ``reference``, prompt + 6 steps; returns the
    lowered decoder."""
    rng = np.random.default_rng(seed)
    prompt, tokens = rng.integers(3, 256, 10), rng.integers(3, 256, 6)
    fused, got = _steps(model, True, prompt, tokens)
    _, want = _steps(reference, False, prompt, tokens)
    for step_index, (g, w) in enumerate(zip(got, want, strict=True)):
        assert _rel(g, w) < tolerance, f"step {step_index} differs by {_rel(g, w):.2e}"
    return fused


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_lowered_decoder_matches_standard_graph(name, tmp_path):
    from bitfold.llm import export_llm

    make(name, tmp_path)
    model, _, _ = export_llm(tmp_path)
    nodes = len(list(model.graph))
    rng = np.random.default_rng(1)
    prompt, tokens = rng.integers(3, 256, 14), rng.integers(3, 256, 20)  # past the sliding windows (8)
    fused, got = _steps(model, True, prompt, tokens)
    _, want = _steps(model, False, prompt, tokens)
    assert len(list(model.graph)) == nodes, "the lowering must not touch its input"
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert _rel(g, w) < 1e-5, f"{name}: step {step} differs by {_rel(g, w):.2e}"
    lowered = fused.fusion
    assert lowered.last_logits and lowered.skip_norms >= 2 * 2
    if name == "phi3-fused-partial":  # 8 rotary dims: ORT's kernel rotates multiples of 16
        assert not lowered.attention and "rotates" in lowered.reason
    else:
        ops = [n.op_type for n in lowered.model.graph]
        assert lowered.attention, lowered.reason
        assert ops.count("GroupQueryAttention") == 2 and "Softmax" not in ops and "Concat" not in ops


@pytest.mark.parametrize("name", ["llama-tied-llama3rope", "qwen2-bias", "gemma2-softcap"])
def test_float16_cache_follows_the_float32_decoder(name, tmp_path):
    """kv_cache='float16': the cache buffers are float16, past and present still share them, and every step's logits
    stay within float16 rounding of the float32 cache's while greedy decoding picks the same tokens."""
    import onnx_ir as ir

    from bitfold.llm import export_llm
    from bitfold.llm.generate import Decoder, generate_ids

    make(name, tmp_path)
    model, _, _ = export_llm(tmp_path)
    rng = np.random.default_rng(5)
    prompt, tokens = rng.integers(3, 256, 12), rng.integers(3, 256, 16)
    half = Decoder(model, max_length=48, kv_cache="float16")
    full = Decoder(model, max_length=48)
    assert half.shared and half.dtype == np.float16 and full.dtype == np.float32
    types = {v.name: v.dtype for v in half.fusion.model.graph.inputs if v.name.startswith("past_key_values")}
    assert set(types.values()) == {ir.DataType.FLOAT16}
    got = [half(prompt)] + [half(np.asarray([t])) for t in tokens]
    want = [full(prompt)] + [full(np.asarray([t])) for t in tokens]
    errors = [_rel(g, w) for g, w in zip(got, want, strict=True)]
    assert max(errors) < 5e-3, f"largest step error {max(errors):.2e}"
    assert min(errors) > 0, "a float16 cache that changes nothing was not float16"
    assert generate_ids(half, list(prompt), 12).tokens == generate_ids(full, list(prompt), 12).tokens


def test_float16_cache_needs_the_fused_attention(tmp_path):
    from bitfold.errors import BitfoldError
    from bitfold.llm import export_llm
    from bitfold.llm.generate import Decoder

    make("llama-tied-llama3rope", tmp_path)
    model, _, _ = export_llm(tmp_path)
    with pytest.raises(BitfoldError, match="needs the fused attention"):
        Decoder(model, max_length=32, fuse=False, kv_cache="float16")
    with pytest.raises(BitfoldError, match="kv_cache must be one of float32, float16"):
        Decoder(model, max_length=32, kv_cache="int8")


@pytest.mark.parametrize("name", ["qwen2-bias", "llama-tied-llama3rope"])
def test_packed_qkv_of_quantized_linears(name, tmp_path):
    """q, k, v MatMulNBits (and q/k/v biases) become one MatMulNBits feeding GroupQueryAttention's packed input."""
    import bitfold
    from bitfold.llm import export_llm

    make(name, tmp_path)
    model, _, _ = export_llm(tmp_path)
    step = {"name": "quantize-weights", "bits": 4, "group_size": 32, "format": "matmulnbits", "accuracy_level": 0}
    model, _ = bitfold.optimize(model, [step])
    fused = _lowered_matches(model, model, seed=2)
    graph = fused.fusion.model.graph
    gqa = [n for n in graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2
    for node in gqa:
        assert node.inputs[1] is None and node.inputs[2] is None  # packed QKV
        producer = node.inputs[0].producer()
        if producer.op_type == "Add":  # the packed bias
            producer = producer.inputs[0].producer()
        assert producer.op_type == "MatMulNBits" and producer.attributes["N"].as_int() == 64 + 2 * 2 * 16


def test_last_position_head(tmp_path):
    from bitfold.backends.ort_llm import lower_decoder
    from bitfold.llm import export_llm
    from bitfold.backends.ort import OrtRunnable
    from bitfold.llm.feeds import prefill

    make("llama-tied-llama3rope", tmp_path)
    model, _, _ = export_llm(tmp_path)
    lowered = lower_decoder(model, max_length=32, last_logits=True)
    ids = np.random.default_rng(3).integers(3, 256, (1, 9))
    feeds = prefill(model, ids)  # an empty past: GroupQueryAttention then returns a fresh present
    full = OrtRunnable(model, device="cpu").run(feeds)["logits"]
    last = OrtRunnable(lowered.model, device="cpu").run(feeds)["logits"]
    assert last.shape == (1, 1, 256)
    assert _rel(last[0, 0], full[0, -1]) < 1e-5


@pytest.mark.parametrize("k, block", [(96, 32), (100, 32), (40, 64)])
def test_float_zero_points_split_into_default_zero_and_group_offsets(k, block):
    """Two MatMulNBits on one input with float zero points (a min-max grid, padded when K is not a multiple of the
    block) compute the same after the split, which sums each group of the shared input once."""
    import onnx_ir as ir

    from bitfold.backends.ort import OrtRunnable
    from bitfold.backends.ort import split_float_zero_points
    from bitfold.quant import matmulnbits

    rng = np.random.default_rng(4)
    x = ir.Value(name="x", shape=ir.Shape([2, 3, k]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 21, "com.microsoft": 1}, name="g")
    weights = []
    for j, n in enumerate((24, 40)):
        groups = -(-k // block)
        codes = rng.integers(0, 16, (n, k))
        scales = rng.uniform(0.01, 0.1, (n, groups)).astype(np.float32)
        zeros = rng.uniform(-4.0, 20.0, (n, groups)).astype(np.float32)  # anywhere, as min / scale is
        packed, scales, zeros = matmulnbits.pack(codes, scales, zeros, 4, block, float_zero=True)
        weights.append(matmulnbits.unpack(packed, scales, zeros, 4, block, k))
        values = []
        for name, array in (("b", packed), ("s", scales), ("z", zeros)):
            value = ir.Value(name=f"{name}{j}", shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                             const_value=ir.tensor(array))  # fmt: skip
            graph.register_initializer(value)
            values.append(value)
        node = ir.Node("com.microsoft", "MatMulNBits", [x, *values], ir.convenience.convert_attributes(
            {"K": k, "N": n, "bits": 4, "block_size": block, "accuracy_level": 0}), name=f"linear{j}")  # fmt: skip
        node.outputs[0].name = f"y{j}"
        node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        graph.append(node)
        graph.outputs.append(node.outputs[0])
    model = ir.Model(graph, ir_version=10)
    feeds = {"x": rng.standard_normal((2, 3, k)).astype(np.float32)}
    before = OrtRunnable(model, device="cpu").run(feeds)
    assert split_float_zero_points(graph) == 2
    ops = [node.op_type for node in graph]
    assert ops.count("MatMulNBits") == 2 and ops.count("MatMul") == 3  # one group sum for the shared input
    assert all(len(node.inputs) == 3 for node in graph if node.op_type == "MatMulNBits")
    after = OrtRunnable(model, device="cpu").run(feeds)
    for j, weight in enumerate(weights):
        want = feeds["x"] @ weight
        scale = np.abs(want).max()
        assert np.abs(before[f"y{j}"] - want).max() / scale < 1e-5
        assert np.abs(after[f"y{j}"] - want).max() / scale < 1e-5


def test_min_max_grid_decoder_runs_split(tmp_path):
    """A model quantized to the min-max grid (float zero points) generates the same through the lowered decoder, whose
    session runs every MatMulNBits with the default zero point and the offsets beside it."""
    import bitfold
    from bitfold.llm import export_llm

    make("llama-tied-llama3rope", tmp_path)
    model, _, _ = export_llm(tmp_path)
    step = {"name": "quantize-weights", "bits": 4, "group_size": 32, "symmetric": False, "zero_point": "float",
            "format": "matmulnbits", "accuracy_level": 0}  # fmt: skip
    packed, _ = bitfold.optimize(bitfold.clone(model), [step])
    fake, _ = bitfold.optimize(model, [{**step, "format": "fake"}])  # the same grid as float weights: the reference
    assert any(node.op_type == "MatMulNBits" and len(node.inputs) == 4 for node in packed.graph)
    fused = _lowered_matches(packed, fake, seed=5)
    nbits = [node for node in fused.fusion.model.graph if node.op_type == "MatMulNBits"]
    assert nbits and fused.runnable.split_zero_points == len(nbits)  # q, k and v packed first, then split


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("fuse", [True, False])
def test_prompt_in_chunks_matches_one_call(name, fuse, tmp_path):
    """A prompt fed in chunks (each attending to the cache the earlier ones wrote, across the sliding windows of 8)
    gives the logits of one whole-prompt call, and the steps after it too."""
    from bitfold.llm import export_llm
    from bitfold.llm.generate import Decoder

    make(name, tmp_path)
    model, _, _ = export_llm(tmp_path)
    rng = np.random.default_rng(2)
    prompt, tokens = rng.integers(3, 256, 23), rng.integers(3, 256, 4)
    results = []
    for chunk in (0, 5):
        decoder = Decoder(model, max_length=32, fuse=fuse, prefill_chunk=chunk)
        calls, run = [], decoder.session.run_with_iobinding
        decoder.session.run_with_iobinding = lambda binding: (calls.append(1), run(binding))
        results.append([decoder(prompt)] + [decoder(np.asarray([t])) for t in tokens])
        assert decoder.length == prompt.size + tokens.size
        assert len(calls) == (5 if chunk else 1) + tokens.size  # 23 tokens: chunks of 5, 5, 5, 5, 3
    for step, (g, w) in enumerate(zip(*results, strict=True)):
        assert _rel(g, w) < 1e-5, f"{name}: step {step} differs by {_rel(g, w):.2e}"


def test_prefill_chunk_must_not_be_negative():
    from bitfold.errors import BitfoldError
    from bitfold.llm.generate import Decoder

    with pytest.raises(BitfoldError, match="prefill_chunk"):
        Decoder(None, prefill_chunk=-1)
