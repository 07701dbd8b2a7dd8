"""A Conv as per-group MatMuls over input patches: checked against ONNX Runtime's Conv on ONNX's own padding rules."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from bitfold.backends.ort import OrtRunnable
from bitfold.quant.im2col import ConvGeometry, patch_gram, patches


def _conv(weight: np.ndarray, input_shape: tuple[int, ...], **attributes) -> ir.Model:
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attributes)
    graph = helper.make_graph(
        [node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [onnx.numpy_helper.from_array(weight, "w")],
    )  # fmt: skip
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9))


@pytest.mark.parametrize(
    "c_in, c_out, kernel, attributes",
    [
        (3, 4, (3, 3), {"pads": [1, 1, 1, 1]}),
        (4, 6, (3, 2), {"pads": [0, 1, 2, 0], "strides": [2, 1], "dilations": [1, 2]}),
        (6, 6, (5, 5), {"group": 6, "auto_pad": "SAME_UPPER", "strides": [2, 2]}),
        (4, 8, (2, 4), {"group": 2, "auto_pad": "SAME_LOWER"}),
        (4, 4, (3, 3), {"group": 2, "auto_pad": "VALID", "strides": [1, 2]}),
        (5, 3, (1, 1), {}),
    ],
)
def test_conv_equals_group_rows_times_patches(c_in, c_out, kernel, attributes):
    rng = np.random.default_rng(0)
    groups = attributes.get("group", 1)
    w = rng.standard_normal((c_out, c_in // groups, *kernel)).astype(np.float32)
    x = rng.standard_normal((2, c_in, 9, 11)).astype(np.float32)
    model = _conv(w, x.shape, **attributes)
    y = next(iter(OrtRunnable(model, device="cpu", optimization="none").run({"x": x}).values()))
    geometry = ConvGeometry.of(next(iter(model.graph)))
    p = patches(x, geometry).numpy()  # (batch, groups, K, pixels)
    rows = w.reshape(groups, c_out // groups, -1)
    got = np.einsum("gnk,bgkl->bgnl", rows, p).reshape(y.shape)
    np.testing.assert_allclose(got, y, rtol=1e-5, atol=1e-5)
    gram = patch_gram(x, geometry)
    assert gram.shape == (groups, rows.shape[2], rows.shape[2])
    # the output energy of every group is tr(W_g H_g W_gᵀ): H is that group's Hessian
    energy = np.einsum("gnk,gkm,gnm->g", rows.astype(np.float64), gram, rows.astype(np.float64))
    np.testing.assert_allclose(energy, (y.reshape(2, groups, -1).astype(np.float64) ** 2).sum(axis=(0, 2)), rtol=1e-4)


def test_geometry_refuses_non_2d_convs():
    w = np.ones((2, 3, 3), np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 3, 8))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [onnx.numpy_helper.from_array(w, "w")])  # fmt: skip
    model = ir.from_proto(helper.make_model(graph))
    assert ConvGeometry.of(next(iter(model.graph))) == "not a 2-D Conv with a constant weight"
