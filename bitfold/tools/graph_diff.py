"""What a pass changed in a graph, as node lists and as an SVG picture.

Nodes are matched by name (bitfold names every node; an unnamed node is keyed by its first output). A node present
in both graphs is *changed* when its op, attributes, input tensor names or the contents of its constant inputs
differ. The picture (``to_svg``) is drawn from the networkx view (``bitfold.passes.analysis``) with matplotlib: the
changed, added and removed nodes and their direct neighbours, laid out in topological layers, coloured by kind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io

import networkx as nx
import onnx_ir as ir

from bitfold.passes.analysis import to_networkx

COLOURS = {"added": "#4a4", "removed": "#c33", "changed": "#e90", "context": "#ccc"}


@dataclasses.dataclass
class GraphDiff:
    added: list[str]  # nodes only in the rewritten graph
    removed: list[str]  # nodes only in the input graph
    changed: list[str]  # in both, but computing something else

    @property
    def size(self) -> int:
        return len(self.added) + len(self.removed) + len(self.changed)


def _key(node: ir.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else "")


def _signature(node: ir.Node) -> tuple:
    constants = []
    for value in node.inputs:
        tensor = value.const_value if value is not None else None
        constants.append(hashlib.sha1(tensor.tobytes()).hexdigest() if tensor is not None else None)
    attributes = tuple(sorted((name, repr(attr.value)) for name, attr in node.attributes.items()))
    return node.domain, node.op_type, attributes, tuple(v.name if v is not None else "" for v in node.inputs), tuple(constants)


def diff(before: ir.Model, after: ir.Model) -> GraphDiff:
    old = {_key(n): n for n in before.graph}
    new = {_key(n): n for n in after.graph}
    changed = [k for k in new if k in old and _signature(new[k]) != _signature(old[k])]
    return GraphDiff([k for k in new if k not in old], [k for k in old if k not in new], changed)


def to_svg(before: ir.Model, after: ir.Model, changes: GraphDiff, limit: int = 60) -> str:
    """The changed region (at most ``limit`` nodes, changes first) as an SVG element to inline in HTML."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    view_after, view_before = to_networkx(after.graph), to_networkx(before.graph)
    by_key = {**{("before", _key(n)): n for n in view_before}, **{("after", _key(n)): n for n in view_after}}
    kinds = {("after", k): "added" for k in changes.added}
    kinds |= {("after", k): "changed" for k in changes.changed}
    kinds |= {("before", k): "removed" for k in changes.removed}
    after_keys = {_key(n) for n in view_after}

    def ref(side: str, node: ir.Node) -> tuple[str, str]:  # a node kept by the pass is drawn once, from the after side
        return ("after", _key(node)) if _key(node) in after_keys else (side, _key(node))

    views = {"after": view_after, "before": view_before}
    picked = list(kinds)[:limit]
    for side, key in list(picked):  # direct neighbours as context
        node = by_key[(side, key)]
        for other in [*views[side].predecessors(node), *views[side].successors(node)]:
            if ref(side, other) not in picked and len(picked) < limit:
                picked.append(ref(side, other))
    shown = nx.DiGraph()
    for r in picked:
        kind = kinds.get(r, "context")
        shown.add_node(r, kind=kind, label=by_key[r].op_type if kind == "context" else f"{by_key[r].op_type}\n{r[1]}")
    for side, view in views.items():
        for u, v in view.edges():
            a, b = ref(side, u), ref(side, v)
            if a in shown and b in shown and a != b:
                shown.add_edge(a, b)
    for layer, nodes in enumerate(nx.topological_generations(shown) if nx.is_directed_acyclic_graph(shown) else [list(shown)]):
        for ref in nodes:
            shown.nodes[ref]["layer"] = layer
    position = nx.multipartite_layout(shown, subset_key="layer", align="horizontal", scale=1.0)
    position = {ref: (x, -y) for ref, (x, y) in position.items()}
    width = max(6.0, 1.1 * max((sum(1 for r in shown if shown.nodes[r]["layer"] == i) for i in range(len(shown) or 1)), default=1))
    fig, ax = plt.subplots(figsize=(min(width, 24.0), max(3.0, 0.9 * (1 + max((shown.nodes[r]["layer"] for r in shown), default=0)))))
    nx.draw_networkx_edges(shown, position, ax=ax, arrows=True, arrowsize=8, edge_color="#888", node_size=900)
    nx.draw_networkx_nodes(shown, position, ax=ax, node_size=900, node_shape="s",
                           node_color=[COLOURS[shown.nodes[r]["kind"]] for r in shown])  # fmt: skip
    nx.draw_networkx_labels(shown, position, ax=ax, labels={r: shown.nodes[r]["label"] for r in shown}, font_size=6)
    for kind, colour in COLOURS.items():
        ax.scatter([], [], c=colour, marker="s", label=kind)
    ax.legend(loc="upper right", fontsize=7, frameon=False)
    ax.set_axis_off()
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # inline in HTML: no XML prolog or doctype
