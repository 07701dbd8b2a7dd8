"""fold-batchnorm: fold inference-mode BatchNormalization into the linear op that feeds it.

Rewrites (y = s·(z - mean) + beta with s = gamma / sqrt(var + eps), i.e. y = s·z + t):

    BatchNormalization(Conv(x, W, B))           → Conv(x, W·s[o], s·B + t)
    BatchNormalization(ConvTranspose(x, W, B))  → ConvTranspose(x, W·s[o], s·B + t)   (group-aware)
    BatchNormalization(Gemm(x, W, C))           → Gemm(x, W·s[n], s·beta·C + t, beta=1)
    BatchNormalization(Add(MatMul(x, W), b))    → Add(MatMul(x, W·s[n]), s·b + t)
    BatchNormalization(MatMul(x, W))            → Add(MatMul(x, W·s[n]), t)

where o/n index the output channel. Guarantees: exact equivalence up to float rounding of the folded weights
(computed in float64, stored in the weight's dtype). Needs: constant W, bias and BN parameters (run
``constants-to-initializers`` first for graphs that keep weights in Constant nodes).

Leaves alone, with a reason the rewriter's tracer reports: a BN in training mode or with its running-statistics
outputs in use; non-constant BN parameters, weights or biases; a producer whose output has other consumers or is a
graph output (folding would change what they read); MatMul whose output is not 2-D (BN normalizes axis 1, which is
then not the MatMul's output-channel axis). A weight shared with other nodes is copied, never changed in place.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

from bitfold.passes.registry import BitfoldPass, register, stamp


def bn_affine(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm as y = s·z + t (float64)."""
    s = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    return s, beta.astype(np.float64) - mean.astype(np.float64) * s


def scale_output_channels(w: np.ndarray, s: np.ndarray, op_type: str, attrs: dict) -> np.ndarray:
    """Multiply each output channel of weight ``w`` (as ``op_type`` lays it out) by ``s``."""
    w64 = w.astype(np.float64)
    if op_type == "Conv":
        out = w64 * s.reshape((-1,) + (1,) * (w.ndim - 1))
    elif op_type == "ConvTranspose":
        group = attrs.get("group", 1)
        grouped = w64.reshape(group, w.shape[0] // group, w.shape[1], *w.shape[2:])
        out = (grouped * s.reshape(group, 1, w.shape[1], *(1,) * (w.ndim - 2))).reshape(w.shape)
    elif op_type == "Gemm" and attrs.get("transB", 0):
        out = w64 * s[:, None]
    else:  # Gemm (K, N) and MatMul (K, N)
        out = w64 * s[None, :]
    return out.astype(w.dtype)


class _FoldIntoProducer(RewriteRuleClassBase):
    """BN(op(x, W, [B])) for the producer ``op_type``; MatMul subclasses override the pattern."""

    op_type: str
    pass_name = "fold-batchnorm"

    def __init__(self, folded: list[ir.Value]) -> None:
        super().__init__(name=f"fold-batchnorm-{self.op_type.lower()}")
        self.folded = folded

    def pattern(self, op, x):
        z = getattr(op, self.op_type)(x, _allow_other_inputs=True, _outputs=["z"])
        return op.BatchNormalization(z, _allow_other_inputs=True, _outputs=["bn_out"])

    def check(self, context, bn_out: ir.Value, z: ir.Value, **_) -> MatchResult:
        result = MatchResult()
        bn = bn_out.producer()
        producer = _linear_node(z)
        if bn.attributes.get_int("training_mode", 0):
            return result.fail(f"{bn.name}: BatchNormalization runs in training mode.")
        if any(out.uses() or out.is_graph_output() for out in bn.outputs[1:]):
            return result.fail(f"{bn.name}: its running-mean/var outputs are used.")
        if any(_const(v) is None for v in bn.inputs[1:5]):
            return result.fail(f"{bn.name}: scale, bias, mean and var must all be constant.")
        if _const(producer.inputs[1]) is None:
            return result.fail(f"{producer.name}: weight '{producer.inputs[1].name}' is not constant.")
        bias = self._bias(z)
        if bias is not None and _const(bias) is None:
            return result.fail(f"{producer.name}: bias '{bias.name}' is not constant.")
        channels = _const(bn.inputs[1]).shape[0] if _const(bn.inputs[1]).shape else 0
        if self._channels(producer) != channels:
            return result.fail(f"{bn.name}: {channels} channels do not match {producer.name}'s output channels.")
        return result

    def rewrite(self, op, bn_out: ir.Value, z: ir.Value, **_) -> ir.Value:
        bn = bn_out.producer()
        producer = _linear_node(z)
        gamma, beta, mean, var = (_const(v) for v in bn.inputs[1:5])
        s, t = bn_affine(gamma, beta, mean, var, bn.attributes.get_float("epsilon", 1e-5))
        attrs = {k: a.value for k, a in producer.attributes.items()}
        w_value = producer.inputs[1]
        w = scale_output_channels(_const(w_value), s, self.op_type, attrs)
        bias = self._bias(z)
        b = np.zeros_like(t) if bias is None else _const(bias).astype(np.float64)
        if self.op_type == "Gemm":
            b = b * attrs.pop("beta", 1.0)
        new_b = (b * s + t).astype(w.dtype)
        graph = bn.graph
        w_new = op.initializer(ir.tensor(w), name=_fresh(graph, f"{w_value.name}_bnfold"))
        b_new = op.initializer(ir.tensor(new_b), name=_fresh(graph, f"{bn.name or 'bn'}_bias"))
        self.folded.extend(v for v in (w_value, bias, *bn.inputs[1:5]) if v is not None)
        sources = [producer, bn] + ([z.producer()] if z.producer() is not producer else [])
        if self.op_type in ("Conv", "ConvTranspose", "Gemm"):
            out = op.op(self.op_type, producer.inputs[0], w_new, b_new, **attrs)
            _inherit(out.producer(), producer, self.pass_name, sources)
            return out
        matmul = op.MatMul(producer.inputs[0], w_new)
        out = op.Add(matmul, b_new)
        _inherit(matmul.producer(), producer, self.pass_name, sources)
        _inherit(out.producer(), producer, self.pass_name, sources)
        return out

    def _bias(self, z: ir.Value) -> ir.Value | None:
        producer = z.producer()
        if producer.op_type == "Add":
            return next(v for v in producer.inputs if v.producer() is None or v.producer().op_type != "MatMul")
        return producer.inputs[2] if len(producer.inputs) > 2 else None

    def _channels(self, producer: ir.Node) -> int:
        w = _const(producer.inputs[1])
        if self.op_type == "ConvTranspose":
            return w.shape[1] * producer.attributes.get_int("group", 1)
        if self.op_type == "Conv" or (self.op_type == "Gemm" and producer.attributes.get_int("transB", 0)):
            return w.shape[0]
        return w.shape[-1]


class FoldIntoConv(_FoldIntoProducer):
    op_type = "Conv"


class FoldIntoConvTranspose(_FoldIntoProducer):
    op_type = "ConvTranspose"


class FoldIntoGemm(_FoldIntoProducer):
    op_type = "Gemm"


class FoldIntoMatMul(_FoldIntoProducer):
    op_type = "MatMul"

    def pattern(self, op, x, w):
        z = op.MatMul(x, w, _outputs=["z"])
        return op.BatchNormalization(z, _allow_other_inputs=True, _outputs=["bn_out"])

    def check(self, context, bn_out: ir.Value, z: ir.Value, **kw) -> MatchResult:
        result = super().check(context, bn_out=bn_out, z=z, **kw)
        if result and not _is_2d(_linear_node(z)):
            return result.fail(f"{_linear_node(z).name}: MatMul output is not 2-D; BN axis 1 is not its channel.")
        return result


class FoldIntoMatMulAdd(FoldIntoMatMul):
    def pattern(self, op, x, w, b):
        z = op.Add(op.MatMul(x, w), b, _outputs=["z"])
        return op.BatchNormalization(z, _allow_other_inputs=True, _outputs=["bn_out"])


@register
class FoldBatchNorm(BitfoldPass):
    """Fold inference BatchNormalization into the preceding Conv, ConvTranspose, Gemm or MatMul(+Add)."""

    name = "fold-batchnorm"
    family = "canonical"

    def rule_set(self, folded: list[ir.Value] | None = None) -> RewriteRuleSet:
        """The pass's rewrite rules (``folded`` collects the weights they replace); the debugger dry-runs them with a
        MatchingTracer to say why a BatchNormalization was left alone."""
        folded = [] if folded is None else folded
        rules = [cls.rule(folded) for cls in (FoldIntoConv, FoldIntoConvTranspose, FoldIntoGemm, FoldIntoMatMulAdd, FoldIntoMatMul)]
        return RewriteRuleSet(rules, commute=True)

    def rewrite(self, model: ir.Model) -> int:
        folded: list[ir.Value] = []
        count = self.rule_set(folded).apply_to_model(model)
        for value in dict.fromkeys(folded):
            if not value.uses() and value.is_initializer() and not value.is_graph_input() and not value.is_graph_output():
                value.graph.initializers.pop(value.name, None)
        return count


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _linear_node(z: ir.Value) -> ir.Node:
    node = z.producer()
    if node.op_type == "Add":
        return next(v.producer() for v in node.inputs if v.producer() is not None and v.producer().op_type == "MatMul")
    return node


def _is_2d(matmul: ir.Node) -> bool:
    shape = matmul.inputs[0].shape
    return shape is not None and len(shape) == 2 and _const(matmul.inputs[1]).ndim == 2


def _fresh(graph: ir.Graph, base: str) -> str:
    name, i = base, 1
    while name in graph.initializers:
        name, i = f"{base}_{i}", i + 1
    return name


def _inherit(node: ir.Node, linear: ir.Node, pass_name: str, sources: list[ir.Node]) -> None:
    """Provenance, plus the linear op's torch module scope: the folded op is that module (exclude globs name it)."""
    stamp(node, pass_name, sources)
    if "namespace" in linear.metadata_props:
        node.metadata_props["namespace"] = linear.metadata_props["namespace"]
