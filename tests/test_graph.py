"""Task ``graph``: the graph loaders, splits, GNN message passing, the GLNN and VQGraph losses, the VQ codebook, and
whole runs (your own files; the tiny WordNet recipe)."""

from __future__ import annotations

import json

import pytest
import torch

from kdistill.data.graphs import graph_files, split_nodes, subgraph, undirected_edges
from kdistill.errors import KDistillError
from kdistill.losses.graph import code_logits, link_bce, soft_assignment, vq_terms
from kdistill.losses.logits import forward_kl
from kdistill.methods.base import ModelOutput
from kdistill.methods.glnn import GLNN
from kdistill.modules.codebook import VectorQuantizer

NODES = "id,f1,f2,label\na,1,0,x\nb,2,1,x\nc,3,0,y\nd,4,1,y\ne,5,0,\nf,6,1,x\n"
EDGES = "source\ttarget\na\tb\nb\ta\nb\tc\nc\tc\nd\te\nc\tb\nf\ta\n"


def _files(tmp_path, nodes: str = NODES, edges: str = EDGES, node_name: str = "nodes.csv",
           edge_name: str = "edges.tsv"):
    (tmp_path / node_name).write_text(nodes)
    (tmp_path / edge_name).write_text(edges)
    return str(tmp_path / edge_name), str(tmp_path / node_name)


# ---------------------------------------------------------------------------------------------- data


def test_graph_files_hand_made_graph(tmp_path):
    edges, nodes = _files(tmp_path)
    g = graph_files(edges, nodes, feature_columns=["f1", "f2"])
    assert g.node_ids == list("abcdef") and g.class_names == ["x", "y"]
    assert g.y.tolist() == [0, 0, 1, 1, -100, 0]  # e has no label
    # a-b (given twice), b-c (twice), d-e, f-a; the self-loop c-c dropped; both directions, sorted
    pairs = {(0, 1), (1, 2), (3, 4), (0, 5)}
    want = sorted({p for a, b in pairs for p in ((a, b), (b, a))})
    assert [tuple(e) for e in g.edge_index.T.tolist()] == want
    f1 = torch.arange(1.0, 7.0)
    assert torch.allclose(g.x[:, 0], (f1 - f1.mean()) / (f1.std(unbiased=False) + 1e-6), atol=1e-5)
    assert g.summary()["edges"] == 4 and g.summary()["labelled"] == 5


def test_graph_files_feature_lists_and_text(tmp_path):
    rows = [{"node": i, "vec": [float(i), 1.0 - i], "cls": i % 2, "text": f"word{i % 3} shared text"}
            for i in range(8)]
    (tmp_path / "nodes.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "edges.csv").write_text("source,target\n0,1\n1,2\n")
    g = graph_files(str(tmp_path / "edges.csv"), str(tmp_path / "nodes.jsonl"), id_column="node",
                    label_column="cls", features_column="vec")
    assert g.x.tolist()[3] == [3.0, -2.0] and g.class_names == ["0", "1"] and g.y.tolist() == [0, 1] * 4
    t = graph_files(str(tmp_path / "edges.csv"), str(tmp_path / "nodes.jsonl"), id_column="node",
                    label_column="cls", text_column="text", feature_dim=2)
    assert t.x.shape == (8, 2) and torch.isfinite(t.x).all()
    assert torch.allclose(t.x[0], t.x[3])  # the same text -> the same features


@pytest.mark.parametrize("nodes, edges, kwargs, match", [
    (NODES, EDGES + "a\tz\n", {}, r"names node 'z' in column 'target'.*not in the node table"),
    (NODES + "a,7,0,x\n", EDGES, {}, r"node id 'a' appears in rows 1 and 7"),
    (NODES, EDGES, {"label_column": "lable"}, r"column 'lable' is not in the data\. Did you mean 'label'"),
    (NODES.replace("3,0,y", "three,0,y"), EDGES, {}, r"row 3, column 'f1': got 'three', expected a number"),
    (NODES, EDGES, {"text_column": "id"}, r"got 2 kinds of node features"),
    (NODES.replace(",y", ",x"), EDGES, {}, r"1 distinct label\(s\); expected at least two classes"),
    (NODES, "from\tto\na\tb\n", {}, r"column 'source' is not in the data"),
])
def test_bad_graph_files_say_what_and_how_to_fix(tmp_path, nodes, edges, kwargs, match):
    e, n = _files(tmp_path, nodes, edges)
    with pytest.raises(KDistillError, match=match):
        graph_files(e, n, **{"feature_columns": ["f1", "f2"], **kwargs})


def test_split_and_the_inductive_split_hides_test_nodes_and_their_edges():
    n = 200
    y = torch.arange(n) % 4
    y[:10] = -100  # unlabelled nodes are never in a split
    split = split_nodes(y, train_fraction=0.2, val_fraction=0.1, test_fraction=0.3, inductive_fraction=0.5, seed=3)
    parts = [set(split.train.tolist()), set(split.val.tolist()), set(split.test.tolist())]
    assert [len(p) for p in parts] == [38, 19, 57] and not (parts[0] & parts[1] or parts[0] & parts[2] or
                                                           parts[1] & parts[2])
    assert all(i >= 10 for p in parts for i in p)
    hidden = set(split.hidden.tolist())
    assert hidden <= parts[2] and len(hidden) == 28 and set(split.transductive().tolist()) == parts[2] - hidden
    g = torch.Generator().manual_seed(0)
    ei = undirected_edges(torch.randint(n, (600,), generator=g), torch.randint(n, (600,), generator=g), n)
    observed = split.observed(n)
    visible = subgraph(ei, observed)
    touches = torch.isin(visible, split.hidden).any(0)
    assert not touches.any()  # no edge of a hidden node is visible
    kept = ~torch.isin(ei, split.hidden).any(0)
    assert visible.shape[1] == int(kept.sum()) > 0  # every other edge is
    relabelled = subgraph(ei, observed, relabel=True)
    rows = torch.nonzero(observed).flatten()
    assert torch.equal(rows[relabelled], visible)
    transductive = split_nodes(y, inductive_fraction=0.0, seed=3)
    assert len(transductive.hidden) == 0 and bool(transductive.observed(n).all())
    with pytest.raises(KDistillError, match="train \\+ val \\+ test <= 1"):
        split_nodes(y, train_fraction=0.6, val_fraction=0.3, test_fraction=0.3)


# ---------------------------------------------------------------------------------------------- message passing


def _dense_adjacency(edge_index: torch.Tensor, n: int) -> torch.Tensor:
    a = torch.zeros(n, n)
    a[edge_index[0], edge_index[1]] = 1.0
    return a


def _graph(n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ei = undirected_edges(torch.randint(n, (20,), generator=g), torch.randint(n, (20,), generator=g), n)
    return torch.randn(n, 5, generator=g), ei


def test_gcn_and_sage_layers_match_a_dense_reference():
    from kdistill.models.gnn import GraphModel

    x, ei = _graph()
    n = len(x)
    a = _dense_adjacency(ei, n)
    assert torch.equal(a, a.T)
    torch.manual_seed(0)
    gcn = GraphModel(5, 3, kind="gcn", hidden=4, layers=1).eval()
    a_hat = a + torch.eye(n)
    d = a_hat.sum(1).pow(-0.5)
    norm = d[:, None] * a_hat * d[None, :]  # D^-1/2 (A + I) D^-1/2 (Kipf & Welling)
    conv = gcn.convs[0]
    ref = norm @ (x @ conv.lin.weight.T) + conv.bias
    assert torch.allclose(conv(x, ei), ref, atol=1e-5)
    gcn.set_graph(x, ei)
    logits = gcn(torch.arange(n))
    assert torch.allclose(logits, gcn.head(torch.relu(ref)), atol=1e-5)

    sage = GraphModel(5, 3, kind="sage", hidden=4, layers=1).eval()
    conv = sage.convs[0]
    deg = a.sum(1, keepdim=True)
    mean = (a @ x) / deg.clamp_min(1)  # mean over neighbours, 0 for an isolated node
    ref = conv.lin_l(mean) + conv.lin_r(x)
    assert torch.allclose(conv(x, ei), ref, atol=1e-5)


def test_serving_path_with_the_neighbour_fetch_equals_the_full_graph():
    from kdistill.models.gnn import GraphModel, neighbour_fetch

    x, ei = _graph(n=40, seed=1)
    torch.manual_seed(0)
    model = GraphModel(5, 3, kind="gcn", hidden=8, layers=2).eval().set_graph(x, ei)
    index = torch.tensor([3, 17, 25])
    assert torch.allclose(model.predict_nodes(index, x, ei), model(index), atol=1e-5)
    x_sub, sub_edges, mapping = neighbour_fetch(index, 2, x, ei)
    assert torch.equal(x_sub[mapping], x[index]) and len(x_sub) < len(x)
    # a 1-hop fetch is not enough for a 2-layer GCN: the logits then differ
    one_hop = GraphModel(5, 3, kind="gcn", hidden=8, layers=2).eval()
    one_hop.load_state_dict(model.state_dict())
    one_hop.layers = 1
    assert not torch.allclose(one_hop.predict_nodes(index, x, ei), model(index), atol=1e-4)


# ---------------------------------------------------------------------------------------------- losses, methods


def test_glnn_loss_is_the_kd_loss_on_node_logits():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 4, generator=g, requires_grad=True), torch.randn(6, 4, generator=g)
    labels = torch.tensor([1, -100, 3, -100, -100, 0])  # three labelled nodes
    out = GLNN(alpha=0.7, kd_temperature=2.0)(ModelOutput(s), ModelOutput(t), {"labels": labels})
    p_t, log_p_s = torch.softmax(t / 2, -1), torch.log_softmax(s / 2, -1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(-1)  # KL(teacher || student) by hand
    assert torch.allclose(out["kd"], 0.7 * 4.0 * kl.mean(), atol=1e-6)  # every node, scaled by T^2
    assert torch.allclose(out["kd"], 0.7 * 4.0 * forward_kl(s, t, kd_temperature=2.0).mean())
    keep = labels >= 0
    ce = torch.nn.functional.cross_entropy(s[keep], labels[keep])  # the labelled nodes only
    assert torch.allclose(out["ce"], 0.3 * ce, atol=1e-6)
    same = GLNN(alpha=1.0)(ModelOutput(t.clone()), ModelOutput(t), {"labels": labels})
    assert set(same) == {"kd"} and float(same["kd"]) == pytest.approx(0.0, abs=1e-7)
    sum(out.values()).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad[1].abs().sum() > 0  # unlabelled rows learn
    none = GLNN(alpha=0.5)(ModelOutput(s), ModelOutput(t), {"labels": torch.full((6,), -100)})
    assert float(none["ce"].detach()) == 0.0  # a batch without labels: no NaN


def test_code_losses_closed_forms():
    z = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    e = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    want = -torch.tensor([[0.0, 1.0, 9.0], [5.0, 4.0, 2.0]]) / 2.0
    assert torch.allclose(code_logits(z, e, code_temperature=2.0), want)
    r = soft_assignment(z, e)
    assert torch.allclose(r.sum(-1), torch.ones(2)) and r.argmax(-1).tolist() == [0, 2]
    cb, cm = vq_terms(z, e[[1, 2]])
    assert cb.tolist() == [1.0, 2.0] and cm.tolist() == [1.0, 2.0]
    bce = link_bce(torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor([1.0, 0.0]))
    assert torch.allclose(bce, torch.full((2,), float(torch.log(torch.tensor(2.0)))))
    with pytest.raises(KDistillError, match="same width"):
        code_logits(z, torch.zeros(3, 5))


def test_vq_codebook_uses_every_code_and_its_terms_behave():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 4, generator=g) * 10
    z = (centres.repeat_interleave(50, 0) + 0.05 * torch.randn(400, 4, generator=g)).requires_grad_(True)
    vq = VectorQuantizer(4, 8).init_kmeans(z, seed=0)
    assert VectorQuantizer.usage(vq(z)[1], 8)["used"] == 1.0  # k-means entries: every one is chosen
    with torch.no_grad():
        vq.pq.codebooks[0] = centres  # one entry a cluster: 8 equally used codes
    quantized, codes, codebook_term, commitment_term = vq(z)
    usage = VectorQuantizer.usage(codes, 8)
    assert usage["used"] == 1.0 and usage["perplexity"] == pytest.approx(8.0, rel=1e-6)
    assert VectorQuantizer.usage(torch.zeros(10, dtype=torch.long), 8) == {"used": 0.125, "perplexity": 1.0}
    assert torch.allclose(quantized, vq.codebook[codes]) and float(commitment_term.detach().mean()) < 0.05
    # straight-through: the gradient of the quantized output reaches z unchanged; the codebook term reaches only
    # the codebook, the commitment term only z
    quantized.sum().backward(retain_graph=True)
    assert torch.allclose(z.grad, torch.ones_like(z))
    z.grad = None
    commitment_term.sum().backward(retain_graph=True)
    assert z.grad.abs().sum() > 0 and vq.pq.codebooks.grad is None
    z.grad = None
    codebook_term.sum().backward()
    assert z.grad is None and vq.pq.codebooks.grad.abs().sum() > 0
    # the commitment term grows with the distance to the entry
    far = vq(z.detach() + 3.0)[3]
    assert float(far.detach().mean()) > float(commitment_term.detach().mean()) + 1.0
    # soft assignments sum to 1 and agree with the hard ones on well-separated data
    r = torch.softmax(vq.soft_logits(z.detach()), -1)
    assert torch.allclose(r.sum(-1), torch.ones(400), atol=1e-5) and torch.equal(r.argmax(-1), codes)
    # a code no encoding chose is moved onto an encoding
    counts = torch.bincount(codes, minlength=8)
    counts[2] = 0
    assert vq.restart_dead(z.detach(), counts, generator=g) == 1
    assert (z.detach() == vq.codebook[2]).all(-1).any()


def test_vqgraph_learns_a_used_codebook_and_trains_a_student():
    from kdistill.methods.vqgraph import VQGraph

    g = torch.Generator().manual_seed(0)
    n = 120
    h = torch.randn(n, 6, generator=g)
    x = torch.randn(n, 5, generator=g)
    ei = undirected_edges(torch.randint(n, (200,), generator=g), torch.randint(n, (200,), generator=g), n)
    method = VQGraph(num_codes=8, code_dim=4, vq_steps=40, vq_batch_size=32, restart_every=10, code_weight=1.0)
    diag = method.fit_graph(teacher_features={"embed": h}, node_features=x, edge_index=ei, seed=0)
    assert diag["codes_used"] >= 0.75 and 1.0 <= diag["codes_perplexity"] <= 8.0
    assert not any(p.requires_grad for p in method.quantizer.parameters())  # frozen for the student
    from kdistill.data.loaders import TensorDictDataset, make_loader
    from kdistill.models.classifiers import build_mlp
    from kdistill.train.loop import fit, make_accelerator

    torch.manual_seed(0)
    student = build_mlp((5,), 3, width=16, depth=2)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    t_logits = torch.randn(n, 3, generator=g)
    labels = torch.where(torch.arange(n) < 30, torch.arange(n) % 3, torch.full((n,), -100))

    def targets(batch):
        i = batch["index"]
        return ModelOutput(logits=t_logits[i], features={"embed": h[i]})

    loader = make_loader(TensorDictDataset(inputs=x, labels=labels, index=torch.arange(n)), 32, seed=0)
    codebook = method.quantizer.codebook.clone()
    res = fit(student=student, method=method, train_loader=loader, accelerator=make_accelerator(),
              teacher_targets=targets, max_steps=3, progress=False, log_every=1)
    assert res.steps == 3 and any(not torch.equal(v, before[k]) for k, v in res.student.state_dict().items())
    assert torch.equal(method.quantizer.codebook, codebook)  # the tokens stay fixed
    feats = torch.randn(4, 16, generator=g, requires_grad=True)
    terms = method(ModelOutput(torch.randn(4, 3, generator=g), {"embed": feats}), targets({"index": torch.arange(4)}),
                   {"labels": labels[:4]})
    assert set(terms) == {"kd", "code"} and float(terms["code"].detach()) > 0  # alpha = 1: no label term
    terms["code"].backward()
    assert method.projector.weight.grad.abs().sum() > 0 and feats.grad.abs().sum() > 0
    assert method.quantizer.pq.codebooks.grad is None and method.encoder.weight.grad is None
    with pytest.raises(KDistillError, match="task `graph`"):
        VQGraph().setup(None)


# ---------------------------------------------------------------------------------------------- whole runs


def _community_graph(tmp_path, n: int = 100):
    """Two communities whose node features are noise: only the edges tell the classes apart."""
    g = torch.Generator().manual_seed(0)
    rows, edges = [], ["source,target"]
    for i in range(n):
        rows.append({"id": f"n{i}", "label": "left" if i < n // 2 else "right",
                     "features": torch.randn(4, generator=g).tolist()})
    for _ in range(4 * n):
        a = int(torch.randint(n // 2, (1,), generator=g))
        b = int(torch.randint(n // 2, (1,), generator=g))
        off = 0 if float(torch.rand(1, generator=g)) < 0.5 else n // 2
        edges.append(f"n{a + off},n{b + off}")
    (tmp_path / "nodes.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "edges.csv").write_text("\n".join(edges))
    return {"edges": str(tmp_path / "edges.csv"), "nodes": str(tmp_path / "nodes.jsonl"),
            "features_column": "features"}


def test_own_graph_files_run_end_to_end(tmp_path):
    from kdistill.api import run

    recipe = {
        "task": "graph", "name": "own_graph", "seed": 0, "data": _community_graph(tmp_path),
        "split": {"train_fraction": 0.3, "val_fraction": 0.1, "test_fraction": 0.4, "inductive_fraction": 0.5},
        "teacher": {"model": {"kind": "gcn", "hidden": 16, "layers": 2, "dropout": 0.0},
                    "train": {"epochs": 60, "batch_size": 1000, "lr": 0.02, "eval_every": 30}},
        "student": {"name": "mlp", "kwargs": {"width": 16, "depth": 1}},
        "method": "glnn", "train": {"epochs": 2, "batch_size": 32},
        "eval": {"latency_nodes": 10, "latency_repeats": 2},
    }
    report = run(recipe, output=tmp_path / "run", progress=False, quiet=True)
    assert (tmp_path / "run" / "report.md").is_file() and (tmp_path / "run" / "report.json").is_file()
    t = report["teacher"]["metrics"]
    assert t["accuracy_inductive"] >= 0.8 and t["accuracy_transductive"] >= 0.8  # the edges carry the label
    assert report["baseline"]["metrics"]["accuracy"] <= 0.7  # noise features alone do not
    assert report["data"]["test_inductive"] == 20 and report["teacher"]["latency_ms"] > 0
    assert report["student"]["latency_ms"] > 0 and report["latency_nodes"] == 10
    assert "inductive" in (tmp_path / "run" / "report.md").read_text()
    again = run(recipe, output=tmp_path / "run2", progress=False, quiet=True)
    assert again["teacher"]["source"].startswith("reused (cache")
    assert again["teacher"]["metrics"] == report["teacher"]["metrics"]


def test_recipe_schema_errors():
    from kdistill.config import load_config
    from kdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="Did you mean 'label_column'"):
        load_config({"task": "graph", "data": {"edges": "e.csv", "nodes": "n.csv", "label_colum": "y"}})
    with pytest.raises(ConfigError, match="Did you mean 'max_nodes'"):
        load_config({"task": "graph", "data": {"name": "wordnet", "kwargs": {"max_node": 10}}})
    cfg = load_config({"task": "graph"})
    assert cfg.method.name == "glnn" and cfg.data.name == "wordnet"


@pytest.mark.resources
def test_wordnet_graph_and_the_tiny_recipe(tmp_path):
    from kdistill.api import run
    from kdistill.data.graphs import LEXNAMES, wordnet_graph

    g = wordnet_graph(max_nodes=300, ball_size=30, feature_dim=16)
    assert g.num_nodes == 300 and g.x.shape == (300, 16)
    a = _dense_adjacency(g.edge_index, 300)
    assert torch.equal(a, a.T) and a.diagonal().sum() == 0 and g.edge_index.shape[1] > 300
    assert all(c.startswith("noun.") and c in LEXNAMES for c in g.class_names)
    hyper = wordnet_graph(max_nodes=300, ball_size=30, feature_dim=16, relations=["hypernym"])
    assert hyper.edge_index.shape[1] < g.edge_index.shape[1]
    with pytest.raises(KDistillError, match="Did you mean 'meronym'"):
        wordnet_graph(relations=["meronyms"])
    report = run("graph/tiny", output=tmp_path / "tiny", progress=False, quiet=True)
    assert (tmp_path / "tiny" / "report.md").is_file()
    assert set(report["variants"]) == {"glnn"} and report["student"]["graph_fit"]["codes_used"] > 0.5
