"""Graph neural network teachers for node classification.

* ``gcn``: Kipf & Welling, 2017, "Semi-Supervised Classification with Graph Convolutional Networks":
  ``H' = D^-1/2 (A + I) D^-1/2 H W``.
* ``sage``: Hamilton, Ying & Leskovec, 2017, "Inductive Representation Learning on Large Graphs" (GraphSAGE),
  mean aggregator: ``h'_v = W_1 h_v + W_2 mean_{u in N(v)} h_u``.

Message passing comes from PyTorch Geometric (``torch_geometric``: ``GCNConv``, ``SAGEConv``, ``k_hop_subgraph``),
which installs from PyPI alone on top of this torch (no compiled extensions needed); ``pip install
'kdistill[graph]'``.

A :class:`GraphModel` holds the graph it runs on (:meth:`GraphModel.set_graph`: features and edges, kept as
non-persistent buffers, so a saved model is only its weights) and maps node ids to logits: ``model(index) ->
(B, C)``. The training loop, ``predict_logits`` and the method hooks then treat a batch of node ids like any other
input. Layers: ``layers`` x (dropout, convolution, ReLU), then ``embed`` (an identity: the node representation
``(B, hidden)`` that feature methods hook) and ``head`` (linear). :meth:`GraphModel.predict_nodes` is the serving
path: gather the ``layers``-hop subgraph around the asked nodes, then run the network on it alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import KDistillError, expect, unknown_name

GNN_KINDS = ("gcn", "sage")


def pyg() -> Any:
    """The ``torch_geometric`` package, or a clear error when it is missing."""
    try:
        import torch_geometric
        import torch_geometric.nn  # noqa: F401
        import torch_geometric.utils  # noqa: F401
    except ImportError:
        raise KDistillError("the graph task needs PyTorch Geometric (GCN / GraphSAGE message passing), which is "
                            "not installed. Fix: `pip install 'kdistill[graph]'` (or `pip install "
                            "torch_geometric`).") from None
    return torch_geometric


class GraphModel(nn.Module):
    """A GCN or GraphSAGE node classifier over the graph given to :meth:`set_graph`; ``forward(index)`` returns the
    logits ``(B, C)`` of the nodes ``index`` ``(B,)``."""

    def __init__(self, num_features: int, num_classes: int, *, kind: str = "gcn", hidden: int = 128,
                 layers: int = 2, dropout: float = 0.5) -> None:
        super().__init__()
        if kind not in GNN_KINDS:
            raise unknown_name("GNN kind", kind, GNN_KINDS)
        expect(layers >= 1, "teacher.model.layers", layers, "an integer >= 1")
        expect(hidden >= 1, "teacher.model.hidden", hidden, "an integer >= 1")
        expect(0.0 <= dropout < 1.0, "teacher.model.dropout", dropout, "a number in [0, 1)")
        g = pyg().nn
        conv = g.GCNConv if kind == "gcn" else (lambda i, o: g.SAGEConv(i, o, aggr="mean"))
        dims = [int(num_features)] + [int(hidden)] * int(layers)
        self.kind, self.layers, self.dropout = kind, int(layers), float(dropout)
        self.convs = nn.ModuleList([conv(dims[i], dims[i + 1]) for i in range(layers)])
        self.embed = nn.Identity()
        self.head = nn.Linear(dims[-1], num_classes)
        self.register_buffer("x", torch.zeros(0, num_features), persistent=False)
        self.register_buffer("edge_index", torch.zeros(2, 0, dtype=torch.long), persistent=False)

    def set_graph(self, x: Tensor, edge_index: Tensor) -> GraphModel:
        """Run on the graph of node features ``x`` ``(N, F)`` and ``edge_index`` ``(2, E)`` from now on."""
        if x.dim() != 2 or x.shape[1] != self.convs[0].in_channels:
            raise KDistillError(f"GraphModel.set_graph: features of shape {tuple(x.shape)}, expected "
                                f"(N, {self.convs[0].in_channels}).")
        if edge_index.dim() != 2 or edge_index.shape[0] != 2:
            raise KDistillError(f"GraphModel.set_graph: edge_index of shape {tuple(edge_index.shape)}, "
                                "expected (2, E).")
        dev = self.head.weight.device
        self.x, self.edge_index = x.to(dev, torch.float32), edge_index.to(dev, torch.long)
        return self

    def encode(self, x: Tensor, edge_index: Tensor) -> Tensor:
        """``(N, hidden)`` node representations of a whole graph."""
        h = x
        for conv in self.convs:
            h = torch.relu(conv(nn.functional.dropout(h, self.dropout, self.training), edge_index))
        return h

    def forward(self, index: Tensor) -> Tensor:
        if self.x.shape[0] == 0:
            raise KDistillError("GraphModel: no graph; call set_graph(x, edge_index) before the forward pass.")
        h = self.encode(self.x, self.edge_index)[index.to(self.x.device).long()]
        return self.head(self.embed(h))

    @torch.no_grad()
    def predict_nodes(self, index: Tensor, x: Tensor, edge_index: Tensor) -> Tensor:
        """Logits of the nodes ``index`` computed the way a server would: fetch their ``layers``-hop subgraph
        (node ids, its edges, the features of its nodes), then run the network on that subgraph only. Equal to the
        full-graph logits of those nodes (a ``layers``-layer network sees exactly that neighbourhood)."""
        x_sub, sub_edges, mapping = neighbour_fetch(index, self.layers, x, edge_index)
        return self.head(self.embed(self.encode(x_sub, sub_edges)[mapping]))


def neighbour_fetch(index: Tensor, num_hops: int, x: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """What serving a ``num_hops``-layer GNN for the nodes ``index`` must fetch: the features of their
    ``num_hops``-hop neighbourhood ``(S, F)``, its edges renumbered ``(2, E')``, and where the asked nodes are in
    it ``(B,)``."""
    subset, sub_edges, mapping, _ = pyg().utils.k_hop_subgraph(index, num_hops, edge_index, relabel_nodes=True,
                                                               num_nodes=x.shape[0])
    return x[subset], sub_edges, mapping


def build_gnn(num_features: int, num_classes: int, **kwargs: Any) -> GraphModel:
    return GraphModel(num_features, num_classes, **kwargs)
