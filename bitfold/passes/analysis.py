"""A networkx view of an onnx-ir graph, for passes that need graph algorithms.

The view is built on demand and read-only: nodes of the DiGraph are the ``ir.Node`` objects themselves, edges run
producer → consumer and carry the connecting ``ir.Value`` (``data["value"]``) and the consumer's input index.
Graph inputs and initializers are not nodes; a pass that needs them reads ``value.producer() is None``. Passes
mutate the IR, never this view; rebuild it after a rewrite.
"""

from __future__ import annotations

import networkx as nx
import onnx_ir as ir


def to_networkx(graph: ir.Graph) -> nx.MultiDiGraph:
    """Dataflow multigraph of ``graph``'s top-level nodes (a node may read one value on several inputs)."""
    view = nx.MultiDiGraph()
    for node in graph:
        view.add_node(node, op_type=node.op_type, name=node.name)
    for node in graph:
        for index, value in enumerate(node.inputs):
            if value is None:
                continue
            producer = value.producer()
            if producer is not None and producer.graph is graph:
                view.add_edge(producer, node, value=value, index=index)
    return view

