"""Graphs for node classification: WordNet (Debian ``wordnet-base``) or your own edge list and node table.

A :class:`GraphData` holds every node's features ``x`` ``(N, F)``, its label ``y`` ``(N,)`` (``-100``: no label)
and the undirected edges as ``edge_index`` ``(2, E)``: both directions of every edge, no self-loops, no
duplicates, sorted. Loaders are registered in :data:`GRAPHS` by name:

* ``wordnet``: synsets as nodes, pointer relations (hypernym/hyponym, meronym/holonym, similar-to, ...) as edges,
  features from the gloss (TF-IDF reduced by a truncated SVD, :func:`text_features`), label = the lexicographer
  file (the supersense, lexnames(5WN)). ``max_nodes`` keeps a seeded snowball sample: breadth-first balls of at
  most ``ball_size`` nodes around random seed synsets, so the subset keeps the local structure of the full graph.
* ``files``: an edge list (CSV, TSV, JSON lines, ...: ``source``, ``target``) and a node table (``id``, a label,
  and numeric feature columns, a column of feature lists, or a text column), read through
  :func:`kdistill.data.files.read_rows`.

:func:`split_nodes` draws the train / validation / test nodes among the labelled ones, and hides
``inductive_fraction`` of the test nodes: a hidden node and its edges are absent from the graph the teacher and
the students train on (:func:`subgraph`) and are restored when the GNN is evaluated, as in GLNN's inductive setting.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import KDistillError, expect, unknown_name
from ..registry import Registry
from .lm import IGNORE_INDEX

GRAPHS: Registry[Any] = Registry("graph dataset")

#: lexicographer files of WordNet 3.0, by number (lexnames(5WN)); a synset's file is its supersense
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession",
    "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition", "verb.consumption",
    "verb.contact", "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession",
    "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)

#: relation name -> WordNet pointer symbols (wninput(5WN)); edges are undirected, so a relation and its inverse
#: (hypernym / hyponym, meronym / holonym) are one relation
WORDNET_RELATIONS: dict[str, tuple[str, ...]] = {
    "hypernym": ("@", "@i", "~", "~i"),
    "meronym": ("#m", "#s", "#p", "%m", "%s", "%p"),
    "similar_to": ("&",),
    "antonym": ("!",),
    "also_see": ("^",),
    "attribute": ("=",),
    "derivation": ("+",),
    "pertainym": ("\\",),
    "domain": (";c", "-c", ";r", "-r", ";u", "-u"),
    "entailment": ("*",),
    "cause": (">",),
    "verb_group": ("$",),
    "participle": ("<",),
}


@dataclass
class GraphData:
    """A node-classification graph: ``x`` ``(N, F)`` float32, ``y`` ``(N,)`` int64 class ids (``-100`` = no label),
    ``edge_index`` ``(2, E)`` int64 (undirected: both directions, no self-loops or duplicates)."""

    name: str
    x: Tensor
    y: Tensor
    edge_index: Tensor
    class_names: list[str]
    node_ids: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_nodes(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "nodes": self.num_nodes, "edges": int(self.edge_index.shape[1]) // 2,
                "features": int(self.x.shape[1]), "num_classes": self.num_classes,
                "labelled": int((self.y >= 0).sum()), **self.extra}


@dataclass
class GraphSplit:
    """Node ids of each split. ``hidden``: the test nodes held out of training together with their edges (the
    inductive test nodes); the other test nodes are the transductive ones."""

    train: Tensor
    val: Tensor
    test: Tensor
    hidden: Tensor

    def observed(self, num_nodes: int) -> Tensor:
        """``(N,)`` bool: nodes present during training (every node but the hidden ones)."""
        mask = torch.ones(num_nodes, dtype=torch.bool)
        mask[self.hidden] = False
        return mask

    def transductive(self) -> Tensor:
        return self.test[~torch.isin(self.test, self.hidden)]

    def summary(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test),
                "test_transductive": len(self.test) - len(self.hidden), "test_inductive": len(self.hidden)}


# ------------------------------------------------------------------------------------------------ edges


def undirected_edges(src: Any, dst: Any, num_nodes: int) -> Tensor:
    """``(2, E)`` edge index with both directions of every pair ``(src[i], dst[i])``, self-loops and duplicates
    removed, sorted by (source, target)."""
    s = torch.as_tensor(np.asarray(src, dtype=np.int64)).reshape(-1)
    d = torch.as_tensor(np.asarray(dst, dtype=np.int64)).reshape(-1)
    expect(len(s) == len(d), "edge endpoints", (len(s), len(d)), "as many sources as targets")
    if len(s) and (min(int(s.min()), int(d.min())) < 0 or max(int(s.max()), int(d.max())) >= num_nodes):
        raise KDistillError(f"edge endpoints: got node ids outside [0, {num_nodes}); expected ids of existing nodes.")
    keep = s != d
    s, d = s[keep], d[keep]
    key = torch.unique(torch.cat([s * num_nodes + d, d * num_nodes + s]))
    return torch.stack([key // num_nodes, key % num_nodes]) if len(key) else torch.zeros(2, 0, dtype=torch.long)


def subgraph(edge_index: Tensor, keep: Tensor, *, relabel: bool = False) -> Tensor:
    """The edges whose two ends are in ``keep`` (a ``(N,)`` bool mask). ``relabel``: node ids renumbered to their
    rank among the kept nodes (rows of ``x[keep]``)."""
    ei = edge_index[:, keep[edge_index[0]] & keep[edge_index[1]]]
    if not relabel:
        return ei
    new_id = torch.cumsum(keep.long(), 0) - 1
    return new_id[ei]


# ------------------------------------------------------------------------------------------------ splits


def split_nodes(y: Tensor, *, train_fraction: float = 0.1, val_fraction: float = 0.1, test_fraction: float = 0.2,
                inductive_fraction: float = 0.0, seed: int = 0) -> GraphSplit:
    """Seeded train / validation / test node ids drawn among the labelled nodes (``y >= 0``), as fractions of
    them; labelled nodes left over stay unlabelled (the students distil on them). ``inductive_fraction`` of the
    test nodes are hidden (their edges too) during training."""
    for name, v in (("train_fraction", train_fraction), ("val_fraction", val_fraction),
                    ("test_fraction", test_fraction)):
        expect(0.0 < v < 1.0, f"split.{name}", v, "a number in (0, 1)")
    expect(train_fraction + val_fraction + test_fraction <= 1.0 + 1e-9, "split fractions",
           (train_fraction, val_fraction, test_fraction), "train + val + test <= 1")
    expect(0.0 <= inductive_fraction <= 1.0, "split.inductive_fraction", inductive_fraction,
           "a number in [0, 1] (0: transductive, 1: every test node unseen during training)")
    labelled = torch.nonzero(y >= 0).flatten()
    g = torch.Generator().manual_seed(int(seed))
    perm = labelled[torch.randperm(len(labelled), generator=g)]
    n = len(perm)
    sizes = [max(1, round(n * f)) for f in (train_fraction, val_fraction, test_fraction)]
    if sum(sizes) > n:
        raise KDistillError(f"split: {n} labelled nodes are too few for train / val / test sizes {sizes}; expected "
                            "at least one node in each. Fix: label more nodes or change the fractions.")
    train, val, test = perm[:sizes[0]], perm[sizes[0]:sizes[0] + sizes[1]], perm[sum(sizes[:2]):sum(sizes)]
    hidden = test[torch.randperm(len(test), generator=g)[:round(len(test) * inductive_fraction)]]
    return GraphSplit(train.sort().values, val.sort().values, test.sort().values, hidden.sort().values)


# ------------------------------------------------------------------------------------------------ features


def text_features(texts: Sequence[str], *, dim: int = 128, max_vocab: int = 50_000, seed: int = 0) -> Tensor:
    """``(N, dim)`` float32 node features from texts: TF-IDF (sublinear term frequency, words seen in at least
    two texts), reduced by a truncated SVD and standardised per column. Cached on disk by a fingerprint of the
    texts and the settings (``$KDISTILL_CACHE/graph_features``), as the SVD of a large graph takes a while. With
    fewer distinct words or texts than ``dim`` the width is what they allow."""
    from sklearn import __version__ as sk_version

    from ..io import cache_root, load_state_dict, save_state_dict_atomic

    expect(dim >= 1, "feature_dim", dim, "an integer >= 1")
    blob = json.dumps({"dim": dim, "max_vocab": max_vocab, "seed": seed, "sklearn": sk_version,
                       "texts": hashlib.sha256("\x1f".join(texts).encode()).hexdigest()})
    path = cache_root() / "graph_features" / f"{hashlib.sha256(blob.encode()).hexdigest()[:20]}.safetensors"
    if path.is_file():
        return load_state_dict(path)["x"]
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    min_df = 2 if len(texts) >= 50 else 1
    try:
        tfidf = TfidfVectorizer(min_df=min_df, max_features=max_vocab, sublinear_tf=True).fit_transform(texts)
    except ValueError:  # an empty vocabulary
        raise KDistillError("node texts: no words found (empty texts or stop words only); expected texts with "
                            "words. Fix: check the text column.") from None
    k = min(dim, tfidf.shape[1] - 1, tfidf.shape[0] - 1)
    if k >= 1:
        z = TruncatedSVD(k, random_state=seed).fit_transform(tfidf)
    else:
        z = tfidf.toarray()
    z = (z - z.mean(0)) / (z.std(0) + 1e-6)
    x = torch.as_tensor(np.ascontiguousarray(z), dtype=torch.float32)
    save_state_dict_atomic(path, {"x": x})
    return x


# ------------------------------------------------------------------------------------------------ WordNet


def _snowball(neighbours: list[list[int]], max_nodes: int, ball_size: int, seed: int) -> np.ndarray:
    """Node ids of a seeded snowball sample: breadth-first balls of at most ``ball_size`` nodes from random
    unvisited seeds until ``max_nodes`` are taken (sorted)."""
    rng = np.random.default_rng(seed)
    n = len(neighbours)
    taken = np.zeros(n, dtype=bool)
    order = rng.permutation(n)
    out: list[int] = []
    for start in order:
        if len(out) >= max_nodes:
            break
        if taken[start]:
            continue
        taken[start] = True
        out.append(int(start))
        ball, queue = 1, deque([int(start)])
        while queue and ball < ball_size and len(out) < max_nodes:
            for j in neighbours[queue.popleft()]:
                if not taken[j] and ball < ball_size and len(out) < max_nodes:
                    taken[j] = True
                    out.append(j)
                    queue.append(j)
                    ball += 1
    return np.sort(np.asarray(out, dtype=np.int64))


@GRAPHS.register("wordnet")
def wordnet_graph(pos: Sequence[str] = ("noun",), relations: Sequence[str] | None = None,
                  max_nodes: int | None = None, ball_size: int = 100, feature_dim: int = 128,
                  examples: bool = False, data_seed: int = 0) -> GraphData:
    """WordNet 3.0 as a graph: the synsets of the ``pos`` data files (``noun``, ``verb``, ``adj``, ``adv``), the
    pointers of ``relations`` (names of :data:`WORDNET_RELATIONS`; all by default) between them as undirected
    edges, gloss features (:func:`text_features`; ``examples`` keeps the quoted usage examples), label = the
    lexicographer file. ``max_nodes``: a seeded snowball sample (``ball_size`` nodes a ball, ``data_seed``)."""
    from .text import WORDNET_POS, _definition, wordnet_synsets

    pos = tuple(pos)
    for p in pos:
        if p not in WORDNET_POS:
            raise unknown_name("WordNet part of speech", p, WORDNET_POS)
    expect(len(set(pos)) == len(pos) >= 1, "data.kwargs.pos", list(pos), "distinct parts of speech, at least one")
    names = list(WORDNET_RELATIONS) if relations is None else list(relations)
    for r in names:
        if r not in WORDNET_RELATIONS:
            raise unknown_name("WordNet relation", r, WORDNET_RELATIONS)
    symbols = {s for r in names for s in WORDNET_RELATIONS[r]}
    expect(max_nodes is None or max_nodes >= 2, "data.kwargs.max_nodes", max_nodes, "an integer >= 2, or null")
    expect(ball_size >= 1, "data.kwargs.ball_size", ball_size, "an integer >= 1")

    synsets = wordnet_synsets(pos)
    where = {(s.pos, s.offset): i for i, s in enumerate(synsets)}
    neighbours: list[list[int]] = [[] for _ in synsets]
    for i, s in enumerate(synsets):
        for sym, p, off in s.pointers:
            j = where.get((p, off))
            if sym in symbols and j is not None and j != i:
                neighbours[i].append(j)
                neighbours[j].append(i)
    if max_nodes is not None and max_nodes < len(synsets):
        keep = _snowball(neighbours, max_nodes, ball_size, data_seed)
    else:
        keep = np.arange(len(synsets))
    new_id = np.full(len(synsets), -1, dtype=np.int64)
    new_id[keep] = np.arange(len(keep))
    src = [new_id[i] for i in keep for j in neighbours[i] if new_id[j] >= 0]
    dst = [new_id[j] for i in keep for j in neighbours[i] if new_id[j] >= 0]
    edge_index = undirected_edges(src, dst, len(keep))

    lex = np.array([synsets[i].lex_filenum for i in keep])
    present = np.unique(lex)
    y = torch.as_tensor(np.searchsorted(present, lex), dtype=torch.long)
    texts = [synsets[i].gloss if examples else _definition(synsets[i].gloss) or synsets[i].gloss for i in keep]
    x = text_features(texts, dim=feature_dim, seed=data_seed)
    return GraphData("wordnet", x, y, edge_index, [LEXNAMES[k] for k in present],
                     [f"{synsets[i].pos}:{synsets[i].offset:08d}" for i in keep],
                     {"pos": list(pos), "relations": names, "feature_dim": int(x.shape[1])})


# ------------------------------------------------------------------------------------------------ your files


def _feature_matrix(rows: list[dict[str, Any]], where: str, *, feature_columns: Sequence[str] | None,
                    features_column: str | None, text_column: str | None, feature_dim: int, seed: int) -> Tensor:
    if text_column is not None:
        return text_features([str(r[text_column] or "") for r in rows], dim=feature_dim, seed=seed)
    if features_column is not None:
        width = None
        out = []
        for i, r in enumerate(rows, start=1):
            v = r[features_column]
            if isinstance(v, str):
                try:
                    v = json.loads(v)
                except json.JSONDecodeError:
                    v = None
            if not isinstance(v, list) or not v or (width is not None and len(v) != width):
                got = str(r[features_column])[:60]
                raise KDistillError(f"{where}: row {i}, column {features_column!r}: got {got!r}, expected a list of "
                                    f"{width or 'N'} numbers (the same length on every row). Fix the row, or name "
                                    "numeric columns in feature_columns.")
            width = len(v)
            out.append(v)
        try:
            return torch.tensor(out, dtype=torch.float32)
        except (TypeError, ValueError):
            raise KDistillError(f"{where}: column {features_column!r} holds lists with non-numbers; expected "
                                "numbers only.") from None
    cols = list(feature_columns or [])
    x = np.empty((len(rows), len(cols)), dtype=np.float32)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            try:
                x[i, j] = float(r[c])
            except (TypeError, ValueError):
                raise KDistillError(f"{where}: row {i + 1}, column {c!r}: got {r[c]!r}, expected a number. Fix: name "
                                    "only numeric columns in feature_columns (text goes in text_column).") from None
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return torch.as_tensor(x)


@GRAPHS.register("files")
def graph_files(edges: str | list[str], nodes: str | list[str], format: str = "auto", id_column: str = "id",
                source_column: str = "source", target_column: str = "target", label_column: str = "label",
                feature_columns: list[str] | None = None, features_column: str | None = None,
                text_column: str | None = None, feature_dim: int = 128, data_seed: int = 0) -> GraphData:
    """Your graph: ``edges`` (files of ``source_column``, ``target_column`` node ids; each edge read both ways,
    self-loops dropped) and ``nodes`` (one row a node: ``id_column``, ``label_column`` (empty = unlabelled), and
    the features: numeric ``feature_columns``, a ``features_column`` of number lists, or a ``text_column`` turned
    into TF-IDF + SVD features of ``feature_dim`` columns). Any format :func:`kdistill.data.files.read_rows` reads."""
    from .files import read_rows, require_columns, resolve_files

    given = [c for c in (feature_columns, features_column, text_column) if c]
    if len(given) != 1:
        raise KDistillError(f"data: got {len(given)} kinds of node features (feature_columns, features_column, "
                            "text_column); expected exactly one: numeric columns, one column of number lists, or a "
                            "text column.")
    node_files, edge_files = resolve_files(nodes), resolve_files(edges)
    node_rows = read_rows(node_files, format=format)
    nwhere = f"data.nodes ({', '.join(map(str, node_files))})"
    require_columns(node_rows, [id_column, label_column, features_column, text_column, *(feature_columns or [])],
                    where=nwhere)
    index: dict[str, int] = {}
    for i, r in enumerate(node_rows):
        key = str(r[id_column])
        if key in index:
            raise KDistillError(f"{nwhere}: node id {key!r} appears in rows {index[key] + 1} and {i + 1}; expected "
                                "one row a node. Fix: remove the duplicate row.")
        index[key] = i
    edge_rows = read_rows(edge_files, format=format)
    ewhere = f"data.edges ({', '.join(map(str, edge_files))})"
    require_columns(edge_rows, [source_column, target_column], where=ewhere)
    src, dst = [], []
    for i, r in enumerate(edge_rows, start=1):
        for col, out in ((source_column, src), (target_column, dst)):
            j = index.get(str(r[col]))
            if j is None:
                raise KDistillError(f"{ewhere}: row {i} names node {str(r[col])!r} in column {col!r}, which is not "
                                    f"in the node table ({len(node_rows)} nodes, {nwhere}); expected every edge end "
                                    "to be a node id. Fix: add the node or remove the edge.")
            out.append(j)
    labels = [r[label_column] for r in node_rows]
    known = [v for v in labels if v is not None and str(v).strip() != ""]
    names = sorted({str(v) for v in known}, key=lambda s: (not s.lstrip("-").isdigit(), int(s) if
                                                           s.lstrip("-").isdigit() else 0, s))
    if len(names) < 2:
        raise KDistillError(f"{nwhere}: column {label_column!r} holds {len(names)} distinct label(s); expected at "
                            "least two classes. Fix: name the label column (label_column).")
    cls = {n: k for k, n in enumerate(names)}
    y = torch.tensor([cls[str(v)] if v is not None and str(v).strip() != "" else IGNORE_INDEX for v in labels],
                     dtype=torch.long)
    x = _feature_matrix(node_rows, nwhere, feature_columns=feature_columns, features_column=features_column,
                        text_column=text_column, feature_dim=feature_dim, seed=data_seed)
    return GraphData("files", x, y, undirected_edges(src, dst, len(node_rows)), names,
                     [str(r[id_column]) for r in node_rows], {"feature_dim": int(x.shape[1])})


def load_graph(name: str, **kwargs: Any) -> GraphData:
    return GRAPHS.get(name)(**kwargs)
