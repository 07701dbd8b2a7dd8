"""fold-batchnorm: fold inference-mode BatchNormalization into the linear op that feeds it.

Rewrites (y = s·(z - mean) + beta with s = gamma / sqrt(var + eps), i.e. y = s·z + t):

    BatchNormalization(Conv(x, W, B))                → Conv(x, W·s[o], s·B + t)
    BatchNormalization(ConvTranspose(x, W, B))       → ConvTranspose(x, W·s[o], s·B + t)   (group-aware)
    BatchNormalization(Gemm(x, W, C))                → Gemm(x, W·s[n], s·beta·C + t, beta=1)
    BatchNormalization(MatMul(x, W))                 → Add(MatMul(x, W·s[n]), t)
    BatchNormalization(Add(Conv(x, W, B), b))        → Conv(x, W·s[o], s·(B + b) + t)   (ConvTranspose alike)
    BatchNormalization(Add(Gemm(x, W, C), b))        → Gemm(x, W·s[n], s·(beta·C + b) + t, beta=1)
    BatchNormalization(Add(MatMul(x, W), b))         → Add(MatMul(x, W·s[n]), s·b + t)

where o/n index the output channel (axis 0 of a Conv weight; axis 1 of a ConvTranspose weight [C_in, C_out/group,
…] within each group; the column of Gemm's effective B, i.e. the row when transB=1; the column of a MatMul weight).
Gemm keeps alpha and transA/transB. The Add's ``b`` must be constant and constant along every axis but the channel
axis 1 of the op's output ([C], [C,1,1], [1,C,1,1] or a scalar for a 2-D Conv; [C] or [1,C] for Gemm); after a
MatMul it may also vary along the rows ([N,C]), as the Add is kept. Guarantees: exact equivalence up to float
rounding of the folded weights (computed in float64, stored in the weight's dtype); a second run changes nothing.
Needs: constant W, biases and BN parameters (run ``constants-to-initializers`` first for graphs that keep weights
in Constant nodes).

Leaves alone, with the reason in the pass's notes and the rewriter's tracer: a BN in training mode or with its
running-statistics outputs in use; non-constant BN parameters, weights or biases (so ``Add(MatMul(x, W1),
MatMul(y, W2))`` stays: neither branch is a constant bias); a bias that varies along a non-channel axis; BN
parameters whose length differs from the op's output channels; a producer whose output has other consumers or is a
graph output (folding would change what they read); a MatMul whose input or weight is not 2-D (BN normalizes axis
1, which is then not the MatMul's output-channel axis). A weight shared with other nodes is copied, never changed
in place.
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
    """BN(op(x, W, [B])), or BN(Add(op(x, W, [B]), b)) when ``with_add``; every value comes from the match."""

    op_type: str
    with_add: bool = False
    pass_name = "fold-batchnorm"

    def __init__(self, folded: list[ir.Value], declined: dict[ir.Node, list[str]]) -> None:
        super().__init__(name=f"fold-batchnorm-{self.op_type.lower()}" + ("-add" if self.with_add else ""))
        self.folded = folded
        self.declined = declined

    def pattern(self, op, x, w, bn_scale, bn_bias, bn_mean, bn_var):
        z = getattr(op, self.op_type)(x, w, _allow_other_inputs=True, _outputs=["lin"])
        return op.BatchNormalization(z, bn_scale, bn_bias, bn_mean, bn_var, _outputs=["bn_out"])

    def check(self, context, bn_out: ir.Value, lin: ir.Value, x: ir.Value, w: ir.Value, b: ir.Value | None = None, **_):
        result = MatchResult()
        reason = self._refusal(bn_out.producer(), lin.producer(), x, w, b if self.with_add else None)
        if reason is None:
            return result
        reasons = self.declined.setdefault(bn_out.producer(), [])
        if reason not in reasons:
            reasons.append(reason)
        return result.fail(reason)

    def _refusal(self, bn: ir.Node, node: ir.Node, x: ir.Value, w: ir.Value, b: ir.Value | None) -> str | None:
        if bn.attributes.get_int("training_mode", 0):
            return "it runs in training mode"
        if any(out.uses() or out.is_graph_output() for out in bn.outputs[1:]):
            return "its running-mean/var outputs are used"
        params = [_const(v) for v in bn.inputs[1:5]]
        if any(p is None for p in params):
            return "its scale, bias, mean and var are not all constant"
        weight = _const(w)
        if weight is None:
            return f"the weight '{w.name}' of {node.op_type} '{node.name}' is not constant"
        if self.op_type == "MatMul" and (weight.ndim != 2 or _rank(x, node.outputs[0]) != 2):
            return f"MatMul '{node.name}' is not known to be 2-D, so BN's axis 1 may not be its output-channel axis"
        if self.op_type == "Gemm" and weight.ndim != 2:
            return f"the weight of Gemm '{node.name}' is not 2-D"
        if self.op_type == "ConvTranspose" and weight.shape[0] % node.attributes.get_int("group", 1):
            return f"the weight of ConvTranspose '{node.name}' does not split into its groups"
        channels = _channels(node, weight)
        if any(p.shape != (channels,) for p in params):
            shape = list(params[0].shape)
            return f"its parameters have shape {shape}, but {node.op_type} '{node.name}' has {channels} output channels"
        inner = _inner_bias(node)
        if inner is not None and _const(inner) is None:
            return f"the bias '{inner.name}' of {node.op_type} '{node.name}' is not constant"
        if b is None:
            return None
        added = _const(b)
        if added is None:
            return f"the Add after {node.op_type} '{node.name}' adds '{b.name}', which is not a constant bias"
        if self.op_type == "MatMul":
            if added.ndim > 2 or (added.ndim and added.shape[-1] not in (1, channels)):
                return f"the bias '{b.name}' of shape {list(added.shape)} does not broadcast on the MatMul's channels"
            return None
        rank = 2 if self.op_type == "Gemm" else weight.ndim
        padded = (1,) * (rank - added.ndim) + added.shape
        if added.ndim > rank or padded[1] not in (1, channels) or any(d != 1 for i, d in enumerate(padded) if i != 1):
            return f"the bias '{b.name}' of shape {list(added.shape)} does not broadcast on channel axis 1 alone"
        return None

    def rewrite(self, op, bn_out: ir.Value, lin: ir.Value, x: ir.Value, w: ir.Value, b: ir.Value | None = None, **_):
        bn, node = bn_out.producer(), lin.producer()
        b = b if self.with_add else None
        s, t = bn_affine(*(_const(v) for v in bn.inputs[1:5]), bn.attributes.get_float("epsilon", 1e-5))
        attrs = {k: a.value for k, a in node.attributes.items()}
        weight = scale_output_channels(_const(w), s, self.op_type, attrs)
        inner = _inner_bias(node)
        total = np.zeros(1) if inner is None else _const(inner).astype(np.float64)
        if self.op_type == "Gemm":
            total = total * attrs.pop("beta", 1.0)
        if b is not None:
            added = _const(b).astype(np.float64)
            per_channel = self.op_type in ("Conv", "ConvTranspose")  # B is [C]; Gemm's C and the kept Add broadcast
            total = total + (np.broadcast_to(added.reshape(-1), s.shape) if per_channel else added)
        new_bias = (total * s + t).astype(weight.dtype)
        graph = bn.graph
        w_new = op.initializer(ir.tensor(weight), name=_fresh(graph, f"{w.name}_bnfold"))
        b_new = op.initializer(ir.tensor(new_bias), name=_fresh(graph, f"{bn.name or 'bn'}_bias"))
        self.folded.extend(v for v in (w, inner, b, *bn.inputs[1:5]) if v is not None)
        sources = [node, bn] + ([bn.inputs[0].producer()] if self.with_add else [])
        if self.op_type == "MatMul":
            matmul = op.MatMul(x, w_new)
            out = op.Add(matmul, b_new)
            _inherit(matmul.producer(), node, self.pass_name, sources)
        else:
            out = op.op(self.op_type, x, w_new, b_new, **attrs)
        _inherit(out.producer(), node, self.pass_name, sources)
        return out


class _WithAdd(_FoldIntoProducer):
    with_add = True

    def pattern(self, op, x, w, b, bn_scale, bn_bias, bn_mean, bn_var):
        z = op.Add(getattr(op, self.op_type)(x, w, _allow_other_inputs=True, _outputs=["lin"]), b)
        return op.BatchNormalization(z, bn_scale, bn_bias, bn_mean, bn_var, _outputs=["bn_out"])


class FoldIntoConv(_FoldIntoProducer):
    op_type = "Conv"


class FoldIntoConvTranspose(_FoldIntoProducer):
    op_type = "ConvTranspose"


class FoldIntoGemm(_FoldIntoProducer):
    op_type = "Gemm"


class FoldIntoMatMul(_FoldIntoProducer):
    op_type = "MatMul"


class FoldIntoConvAdd(_WithAdd):
    op_type = "Conv"


class FoldIntoConvTransposeAdd(_WithAdd):
    op_type = "ConvTranspose"


class FoldIntoGemmAdd(_WithAdd):
    op_type = "Gemm"


class FoldIntoMatMulAdd(_WithAdd):
    op_type = "MatMul"


RULES = (FoldIntoConv, FoldIntoConvTranspose, FoldIntoGemm, FoldIntoMatMul,
         FoldIntoConvAdd, FoldIntoConvTransposeAdd, FoldIntoGemmAdd, FoldIntoMatMulAdd)  # fmt: skip


@register
class FoldBatchNorm(BitfoldPass):
    """Fold inference BatchNormalization into the preceding Conv, ConvTranspose, Gemm or MatMul (+ constant bias Add)."""

    name = "fold-batchnorm"
    family = "canonical"

    def rule_set(
        self, folded: list[ir.Value] | None = None, declined: dict[ir.Node, list[str]] | None = None
    ) -> RewriteRuleSet:
        """The pass's rewrite rules (``folded`` collects the weights they replace, ``declined`` the reasons they gave
        per BatchNormalization); the debugger dry-runs them with a MatchingTracer to say why a BN was left alone."""
        folded = [] if folded is None else folded
        declined = {} if declined is None else declined
        return RewriteRuleSet([cls.rule(folded, declined) for cls in RULES], commute=True)

    def rewrite(self, model: ir.Model) -> int:
        folded: list[ir.Value] = []
        declined: dict[ir.Node, list[str]] = {}
        count = self.rule_set(folded, declined).apply_to_model(model)
        for value in dict.fromkeys(folded):
            if not value.uses() and value.is_initializer() and not value.is_graph_input() and not value.is_graph_output():
                value.graph.initializers.pop(value.name, None)
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
                reasons = "; ".join(declined.get(node, [])) or _unmatched(node)
                self.notes.append(f"BatchNormalization '{node.name}' kept: {reasons}")
        return count


def _unmatched(bn: ir.Node) -> str:
    producer = bn.inputs[0].producer()
    source = f"{producer.op_type} '{producer.name}'" if producer is not None else "a graph input"
    return f"its input comes from {source}, not from Conv, ConvTranspose, Gemm or MatMul (+ a constant bias Add)"


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _inner_bias(node: ir.Node) -> ir.Value | None:
    """The producer's own bias input (Conv/ConvTranspose B, Gemm C), if it has one."""
    return node.inputs[2] if node.op_type != "MatMul" and len(node.inputs) > 2 else None


def _channels(node: ir.Node, weight: np.ndarray) -> int:
    if node.op_type == "ConvTranspose":
        return weight.shape[1] * node.attributes.get_int("group", 1)
    if node.op_type == "Conv" or (node.op_type == "Gemm" and node.attributes.get_int("transB", 0)):
        return weight.shape[0]
    return weight.shape[-1]


def _rank(*values: ir.Value) -> int | None:
    """The rank of the first of ``values`` whose shape is known."""
    return next((len(v.shape) for v in values if v.shape is not None), None)


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
