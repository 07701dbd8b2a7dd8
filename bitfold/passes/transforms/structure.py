"""Structure discovery for the equivalent-transform passes: norms, the linears that read them, the residual stream.

Everything is found from the dataflow, on graphs as torch.onnx exports them:

- **RMSNorm**, decomposed: ``n = x · 1/sqrt(mean(x²) + ε)`` (``Mul``/``Div`` by a ``Reciprocal``/``Sqrt`` chain of a
  last-axis ``ReduceMean`` of ``Pow(x, 2)`` or ``Mul(x, x)``), optionally followed by ``Mul`` with a constant γ;
- **LayerNorm**: the fused ``LayerNormalization`` op (last axis) with constant γ and β;
- **linear readers**: ``MatMul`` whose input 1 is a 2-D constant ``[K, N]`` (an initializer, or ``Transpose`` of one:
  a tied head), optionally followed by ``Add`` of a constant bias ``[N]``;
- the **residual stream**: from an embedding ``Gather`` of a constant table, through the residual ``Add`` nodes whose
  other operand a linear writes, to the norms that read it. Any other reader of the stream makes it unsupported.

Widths and ranks come from the values' shapes where they are annotated, else from the weights (an RMSNorm γ's length);
``infer_shapes`` fills in the shapes many exporters leave out. Functions return the structure or a sentence saying
why it is unsupported; nothing here modifies the graph except ``infer_shapes``, which only annotates values.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

_RSQRT_CHAIN = frozenset({"Reciprocal", "Sqrt", "Add", "Div"})


@dataclasses.dataclass
class Norm:
    """One normalization: ``x`` in, ``output`` out (what consumers read)."""

    kind: str  # "rms" | "layer"
    x: ir.Value
    output: ir.Value
    #: RMS: the core value x/rms(x) (γ not applied); LayerNorm: the LayerNormalization node's output.
    core: ir.Value
    #: The nodes computing the norm from x (for the stream walk: which readers of x belong to it).
    nodes: list[ir.Node]
    #: RMS: the Mul applying γ, or None; LayerNorm: the LayerNormalization node.
    affine: ir.Node | None
    gamma: np.ndarray | None
    beta: np.ndarray | None

    @property
    def has_affine(self) -> bool:
        if self.kind == "layer":
            return not (np.all(self.gamma == 1) and (self.beta is None or np.all(self.beta == 0)))
        return self.affine is not None


@dataclasses.dataclass
class Linear:
    """A MatMul reading a 2-D constant weight ``[K, N]``, with its optional constant bias ``Add``."""

    matmul: ir.Node
    weight: np.ndarray
    bias_add: ir.Node | None
    bias: np.ndarray | None

    @property
    def output(self) -> ir.Value:
        return (self.bias_add or self.matmul).outputs[0]


@dataclasses.dataclass
class Stream:
    """A transformer residual stream of width ``hidden``."""

    hidden: int
    embedding: ir.Node  # Gather(table, ids)
    table: ir.Value
    values: list[ir.Value]  # embedding output and every residual Add output
    norms: list[Norm]  # the norms reading the stream
    readers: list[Linear]  # linears reading a norm of the stream
    writers: list[Linear]  # linears whose output a residual Add adds in


def const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    if not value.is_initializer() and value.producer() is not None:
        return None
    return value.const_value.numpy()


def width(value: ir.Value) -> int | None:
    """The static size of ``value``'s last axis, or None when its shape is not annotated or symbolic there."""
    if value.shape is None or len(value.shape) == 0:
        return None
    last = value.shape[-1]
    return last if isinstance(last, int) else None


def _values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def infer_shapes(model: ir.Model) -> int:
    """Annotate the top-level intermediate values that lack a shape or type, by ONNX shape inference; how many
    values were annotated.

    Only missing annotations are added: the graph's inputs and outputs, subgraph values and every shape or type
    already stated are kept, so what the model computes does not change (value_info alone does). Values inference
    cannot reach (behind custom-domain ops, or computed from inputs of unknown rank) stay unannotated.
    """
    graph = model.graph
    outputs = {id(v) for v in graph.outputs}
    missing = [v for node in graph for v in node.outputs if (v.shape is None or v.dtype is None) and id(v) not in outputs]
    if not missing:
        return 0
    before = [(v, v.shape, v.dtype) for g in model.graphs() for v in _values(g)]
    fillable = {id(v) for v in missing}
    ir.passes.common.ShapeInferencePass(strict_mode=False)(model)
    for v, shape, dtype in before:
        if id(v) not in fillable or shape is not None:
            v.shape = shape
        if id(v) not in fillable or dtype is not None:
            v.dtype = dtype
    return sum(1 for v, shape, dtype in before if id(v) in fillable and (v.shape, v.dtype) != (shape, dtype))


def unabsorbed_reason(x: ir.Value) -> str:
    """Why the producer of ``x`` cannot take a per-channel scale x ← x / s (``passes.scale_fold``'s absorbers: a
    LayerNormalization with constant γ and β, a Mul by a constant per-channel vector, a projection read only by a
    gating Mul; after a plain RMSNorm, a new γ), as a clause for a note."""
    producer = x.producer()
    if producer is None:
        return "it is a graph input, with no producer to absorb 1/s"
    op = f"{producer.domain + '::' if producer.domain else ''}{producer.op_type} '{producer.name}'"
    if producer.domain:
        return f"its producer {op} is outside the ONNX domain, so bitfold cannot fold a scale into it"
    if producer.op_type not in ("LayerNormalization", "Mul"):
        return f"{op} cannot absorb a per-channel scale (absorbers: LayerNormalization, a Mul by a constant γ, a gated MLP's up projection, a plain RMSNorm)"
    if width(x) is None:
        return f"its width is unknown (no static last dimension, even after shape inference), so no per-channel constant of {op} can be matched to it"
    if producer.op_type == "LayerNormalization":
        return f"{op} has a γ or β that is not a constant initializer"
    return f"{op} multiplies by neither a constant [{width(x)}] vector nor a projection that nothing else reads (and that is no graph output)"


def find_norms(graph: ir.Graph) -> list[Norm]:
    """Every RMSNorm (decomposed) and LayerNormalization in the graph's top level."""
    norms = []
    for node in graph:
        if node.domain:
            continue
        if node.op_type == "LayerNormalization":
            norm = _layernorm(node)
        elif node.op_type in ("Mul", "Div"):
            norm = _rmsnorm(node)
        else:
            continue
        if norm is not None:
            norms.append(norm)
    return norms


def _layernorm(node: ir.Node) -> Norm | None:
    x = node.inputs[0]
    rank = len(x.shape) if x.shape is not None else None
    axis = node.attributes.get_int("axis", -1)
    gamma = const(node.inputs[1])
    beta = const(node.inputs[2]) if len(node.inputs) > 2 else None
    if gamma is None or (len(node.inputs) > 2 and node.inputs[2] is not None and beta is None):
        return None
    if not (axis == -1 or (rank is not None and axis == rank - 1)) or gamma.ndim != 1:
        return None
    out = node.outputs[0]
    return Norm("layer", x, out, out, [node], node, gamma, beta)


def _rmsnorm(node: ir.Node) -> Norm | None:
    """``node`` = Mul(x, r) / Div(x, d) at the core of an RMSNorm, else None."""
    candidates = [(0, 1), (1, 0)] if node.op_type == "Mul" else [(0, 1)]
    for xi, ri in candidates:
        x, r = node.inputs[xi], node.inputs[ri]
        chain = _rsqrt_chain(r, x, inverse=node.op_type == "Div")
        if chain is None:
            continue
        core = node.outputs[0]
        nodes = [*chain, node]
        users = [u for u, _ in core.uses()]
        affine, gamma = None, None
        if len(users) == 1 and users[0].op_type == "Mul" and not users[0].domain and not core.is_graph_output():
            other = next(v for v in users[0].inputs if v is not core)
            g = const(other)
            channels = width(x)
            if channels is None and g is not None and g.ndim > 0 and g.size > 1:
                channels = g.shape[-1]  # x unannotated: a [.., 1, C] constant scales the last axis of an [.., C] tensor
            if g is not None and g.size == channels and g.shape[-1:] == (channels,):
                affine, gamma = users[0], g.reshape(-1)
        output = affine.outputs[0] if affine is not None else core
        return Norm("rms", x, output, core, nodes, affine, gamma, None)
    return None


def _rsqrt_chain(r: ir.Value, x: ir.Value, inverse: bool) -> list[ir.Node] | None:
    """The nodes from ``mean(x²)`` to ``r`` (= 1/sqrt(mean + ε), or sqrt(...) when ``inverse``), else None."""
    nodes = []
    value = r
    reciprocals = 0
    for _ in range(6):
        producer = value.producer()
        if producer is None or producer.domain:
            return None
        nodes.append(producer)
        if producer.op_type == "ReduceMean":
            if not _is_square_of(producer.inputs[0], x) or not _last_axis_keepdims(producer, x):
                return None
            square = producer.inputs[0].producer()
            has_sqrt = any(n.op_type == "Sqrt" for n in nodes)
            if not has_sqrt or (reciprocals % 2 == 1) == inverse:
                return None
            return [square, *reversed(nodes)]
        if producer.op_type not in _RSQRT_CHAIN:
            return None
        if producer.op_type == "Reciprocal":
            reciprocals += 1
            value = producer.inputs[0]
        elif producer.op_type == "Sqrt":
            value = producer.inputs[0]
        elif producer.op_type == "Add":  # + ε
            variable = [v for v in producer.inputs if const(v) is None]
            if len(variable) != 1:
                return None
            value = variable[0]
        else:  # Div(1, s)
            if const(producer.inputs[0]) is None or not np.all(const(producer.inputs[0]) == 1):
                return None
            reciprocals += 1
            value = producer.inputs[1]
    return None


def _is_square_of(value: ir.Value, x: ir.Value) -> bool:
    producer = value.producer()
    if producer is None or producer.domain:
        return False
    if producer.op_type == "Pow":
        e = const(producer.inputs[1])
        return producer.inputs[0] is x and e is not None and e.size == 1 and float(e.reshape(())) == 2.0
    return producer.op_type == "Mul" and producer.inputs[0] is x and producer.inputs[1] is x


def _last_axis_keepdims(node: ir.Node, x: ir.Value) -> bool:
    if node.attributes.get_int("keepdims", 1) != 1:
        return False
    axes = const(node.inputs[1]) if len(node.inputs) > 1 else None
    if axes is None:
        attr = node.attributes.get("axes")
        axes = np.array(attr.value) if attr is not None else None
    if axes is None or axes.size != 1:
        return False
    axis = int(axes.reshape(()))
    if axis == -1:
        return True
    rank = rank_of(x)
    return rank is not None and axis == rank - 1


_ELEMENTWISE = frozenset({"Abs", "Add", "Cast", "Div", "Erf", "Exp", "Gelu", "Identity", "Mul", "Neg", "Pow", "Relu", "Sigmoid", "Sub", "Tanh"})


def rank_of(value: ir.Value, depth: int = 16, _seen: dict[int, int | None] | None = None) -> int | None:
    """``value``'s rank: from its shape, else through elementwise producers (the broadcast rank of their inputs);
    None when no annotated shape reaches it that way within ``depth`` producers."""
    if value.shape is not None:
        return len(value.shape)
    seen = {} if _seen is None else _seen
    if id(value) in seen:
        return seen[id(value)]
    producer = value.producer()
    rank = None
    if depth > 0 and producer is not None and not producer.domain and producer.op_type in _ELEMENTWISE:
        ranks = [rank_of(v, depth - 1, seen) if v is not None else None for v in producer.inputs]
        rank = None if not ranks or None in ranks else max(ranks)
    seen[id(value)] = rank
    return rank


def linear(node: ir.Node) -> Linear | None:
    """``node`` as a Linear (MatMul with a 2-D constant weight, possibly Transpose of one), else None."""
    if node.op_type != "MatMul" or node.domain:
        return None
    w = _weight(node.inputs[1])
    if w is None:
        return None
    out = node.outputs[0]
    users = [u for u, _ in out.uses()]
    bias_add, bias = None, None
    if len(users) == 1 and users[0].op_type == "Add" and not users[0].domain and not out.is_graph_output():
        other = next(v for v in users[0].inputs if v is not out)
        b = const(other)
        if b is not None and b.size == w.shape[1] and b.shape[-1:] == (w.shape[1],):
            bias_add, bias = users[0], b.reshape(-1)
    return Linear(node, w, bias_add, bias)


def _weight(value: ir.Value | None) -> np.ndarray | None:
    w = const(value)
    if w is None and value is not None and value.producer() is not None:
        producer = value.producer()
        if producer.op_type == "Transpose" and not producer.domain and list(producer.attributes.get_ints("perm", [1, 0])) == [1, 0]:
            t = const(producer.inputs[0])
            w = t.T if t is not None else None
    if w is None or w.ndim != 2 or w.dtype.kind != "f":
        return None
    return w


def linear_readers(value: ir.Value) -> list[Linear] | str:
    """The linears reading ``value`` as their activation, or why some reader is not one."""
    if value.is_graph_output():
        return f"'{value.name}' is a graph output"
    found = []
    for user, index in value.uses():
        lin = linear(user) if index == 0 else None
        if lin is None:
            return f"'{value.name}' is read by {user.op_type} '{user.name}', not only by linear layers (MatMul with a constant weight)"
        found.append(lin)
    return found or f"'{value.name}' has no readers"


def shared_inputs(graph: ir.Graph, exclude: tuple[str, ...] = ()) -> list[tuple[ir.Value, list[Linear]]]:
    """Each activation only linears read, with those linears (q/k/v together, gate/up together), in graph order.

    Groups with a linear pinned to float32 (a low-rank branch) or matching an ``exclude`` glob are left out.
    """
    seen, groups = set(), []
    for node in graph:
        if node.op_type != "MatMul" or node.domain or id(node.inputs[0]) in seen:
            continue
        x = node.inputs[0]
        seen.add(id(x))
        readers = linear_readers(x)
        if isinstance(readers, str):
            continue
        if any(lin.matmul.metadata_props.get("bitfold.precision") == "float32" or matches(lin.matmul, exclude) for lin in readers):
            continue
        groups.append((x, readers))
    return groups


_LAYOUT_OPS = frozenset({"Pad", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
_OUTPUT_OPS = _LAYOUT_OPS | {"Add", "Cast"}


def reads_graph_input(x: ir.Value) -> bool:
    """Whether ``x`` is a graph input, possibly behind ops that only move or pad its values."""
    while not x.is_graph_input():
        producer = x.producer()
        if producer is None or producer.domain or producer.op_type not in _LAYOUT_OPS:
            return False
        x = producer.inputs[0]
    return True


def feeds_graph_output(y: ir.Value) -> bool:
    """Whether ``y`` reaches a graph output through layout ops, bias or residual Adds and Casts only (a head)."""
    if y.is_graph_output():
        return True
    return any(not user.domain and user.op_type in _OUTPUT_OPS and feeds_graph_output(user.outputs[0]) for user, _ in y.uses())


def matches(node: ir.Node, patterns: tuple[str, ...]) -> bool:
    """Whether an ``exclude`` glob matches the node's name or its torch module scope."""
    scope = (node.name or "", node.metadata_props.get("namespace", ""))
    return any(fnmatch.fnmatchcase(s, p) for p in patterns for s in scope)


def find_embedding(graph: ir.Graph) -> ir.Node | str:
    """The graph's one embedding Gather of a constant 2-D table (where a residual stream starts), or why none."""
    gathers = [n for n in graph if n.op_type == "Gather" and not n.domain and const(n.inputs[0]) is not None and const(n.inputs[0]).ndim == 2]
    if len(gathers) != 1:
        return f"expected one embedding Gather of a constant table, found {len(gathers)}"
    return gathers[0]


def residual_stream(graph: ir.Graph) -> Stream | str:
    """The residual stream, from the embedding Gather to the norms and linears around it, or why it is unsupported."""
    embedding = find_embedding(graph)
    if isinstance(embedding, str):
        return embedding
    table = embedding.inputs[0]
    hidden = const(table).shape[1]
    by_input: dict[int, list[Norm]] = {}
    for norm in find_norms(graph):
        by_input.setdefault(id(norm.x), []).append(norm)
    values, norms, writers, readers = [embedding.outputs[0]], [], [], []
    i = 0
    while i < len(values):
        v = values[i]
        i += 1
        if v.is_graph_output():
            return f"the residual stream value '{v.name}' is a graph output"
        norm_nodes = {id(n): norm for norm in by_input.get(id(v), []) for n in norm.nodes}
        for user, _ in v.uses():
            if id(user) in norm_nodes:
                norm = norm_nodes[id(user)]
                if norm not in norms:
                    norms.append(norm)
                continue
            if user.op_type == "Add" and not user.domain:
                other = next((w for w in user.inputs if w is not v), None)
                if other is not None and other.is_graph_output():
                    return f"'{other.name}', which residual Add '{user.name}' adds to the stream, is a graph output"
                writer = _writer_of(other, hidden)
                if writer is None:
                    return f"residual Add '{user.name}' adds '{getattr(other, 'name', None)}', which no linear writes alone"
                writers.append(writer)
                values.append(user.outputs[0])
                continue
            return f"{user.op_type} '{user.name}' reads the residual stream value '{v.name}'"
    for norm in norms:
        square = norm.nodes[0].outputs[0] if norm.kind == "rms" else None
        if square is not None and (square.is_graph_output() or any(u not in norm.nodes for u, _ in square.uses())):
            return f"the square '{square.name}' of the stream value '{norm.x.name}' is read outside its norm"
        found = linear_readers(norm.output)
        if isinstance(found, str):
            return found
        for lin in found:
            if lin.weight.shape[0] != hidden:
                return f"linear '{lin.matmul.name}' reads the stream with K = {lin.weight.shape[0]}, not {hidden}"
        readers.extend(found)
    if not norms:
        return "no norm reads the residual stream"
    return Stream(hidden, embedding, table, values, norms, readers, writers)


def _writer_of(value: ir.Value | None, hidden: int) -> Linear | None:
    if value is None or len(value.uses()) != 1:
        return None
    producer = value.producer()
    if producer is None:
        return None
    matmul = producer
    if producer.op_type == "Add":  # MatMul + bias
        matmul = next((v.producer() for v in producer.inputs if v.producer() is not None and v.producer().op_type == "MatMul"), None)
        if matmul is None:
            return None
    lin = linear(matmul)
    if lin is None or lin.output is not value or lin.weight.shape[1] != hidden:
        return None
    return lin


def residual_cuts(graph: ir.Graph) -> list[ir.Value] | str:
    """Where a layered model can be cut into blocks: the token embeddings' output (the embedding Gather's, or the
    graph's first input when there is no table), then, in order, every residual Add that all paths from there to
    the graph's first output pass through (an Add of two computed values that dominates the output in the
    dataflow graph). Pre-norm decoders give their residual stream. Where a norm alone reads the Add (post-norm
    encoders such as BERT; not the last Add, whose norm is the model's final one) the cut is the norm's output,
    what the next layer reads. Paths that do not reach the first output (a KV cache's ``present`` outputs) do not
    count. Returns why not when there is no such Add."""
    from bitfold.passes.analysis import to_networkx

    if not graph.outputs or graph.outputs[0].producer() is None:
        return "the graph's first output is not computed by a node"
    tables = [n for n in graph if n.op_type == "Gather" and not n.domain and const(n.inputs[0]) is not None and const(n.inputs[0]).ndim == 2]
    view = to_networkx(graph)
    source = object()
    view.add_node(source)
    if tables:
        starts = tables
    elif graph.inputs:
        starts = [user for user, _ in graph.inputs[0].uses()]
    else:
        return "the graph has no inputs"
    view.add_edges_from((source, node) for node in starts)
    dominators = nx_dominators(view, source, graph.outputs[0].producer())
    if dominators is None:
        return "the graph's first output does not depend on the token embeddings"
    adds = [n for n in dominators if n.op_type == "Add" and not n.domain and all(v is not None and const(v) is None for v in n.inputs)]
    if not adds:
        return "no residual Add lies on every path from the token embeddings to the output"
    first = tables[0].outputs[0] if len(tables) == 1 else graph.inputs[0] if not tables else None
    cuts = [n.outputs[0] for n in adds]
    read_by = {id(norm.x): norm for norm in find_norms(graph)}
    for i, value in enumerate(cuts[:-1]):  # post-norm: what the next layer reads is the norm's output
        norm = read_by.get(id(value))
        if norm is not None and not value.is_graph_output() and all(user in norm.nodes for user, _ in value.uses()):
            cuts[i] = norm.output
    return ([first] if first is not None else []) + cuts


def nx_dominators(view, source: object, end: ir.Node) -> list[ir.Node] | None:
    """The nodes every path from ``source`` to ``end`` in ``view`` passes through (``end`` included), in path order;
    None when no path reaches ``end``."""
    import networkx as nx

    idom = nx.immediate_dominators(view, source)
    if end not in idom:
        return None
    chain, node = [], end
    while node is not source:
        chain.append(node)
        node = idom[node]
    return chain[::-1]
