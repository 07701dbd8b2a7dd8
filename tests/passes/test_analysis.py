from __future__ import annotations

import networkx as nx
from conftest import fresh

from bitfold.passes.analysis import to_networkx


def test_view_mirrors_dataflow(zoo_protos):
    model = fresh(zoo_protos, "shared-bn-input")
    view = to_networkx(model.graph)
    assert isinstance(view, nx.DiGraph) and nx.is_directed_acyclic_graph(view)
    assert set(view.nodes) == set(model.graph)
    conv1 = next(n for n in model.graph if n.op_type == "Conv" and n.inputs[0].name == "x")
    assert sorted(v.op_type for v in view.successors(conv1)) == ["Add", "BatchNormalization"], "the shared BN input"
    for u, v, data in view.edges(data=True):
        assert v.inputs[data["index"]] is data["value"] and data["value"].producer() is u
    order = list(nx.topological_sort(view))
    assert order.index(conv1) < order.index(next(n for n in model.graph if n.op_type == "Add"))
