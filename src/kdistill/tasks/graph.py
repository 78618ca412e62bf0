"""Task ``graph``: a GNN teacher (GCN or GraphSAGE) distilled into an MLP that reads node features alone, compared
with the same MLP trained on the labels alone (the baseline) and with other distilled variants.

The nodes are split once (:func:`kdistill.data.graphs.split_nodes`): labelled train / validation / test nodes,
the rest unlabelled; ``split.inductive_fraction`` of the test nodes are hidden, with their edges, while the
teacher and the students train (0: transductive, every test node's features and edges visible; 1: every test
node unseen). The teacher trains full-graph on the visible graph and is cached by fingerprint like the
classification teacher. Each student trains on the labelled train nodes, or -- a method with
``trains_on_unlabelled`` -- on every visible node, with the teacher's outputs of those nodes on the visible graph
as a table; a method learns what else it needs from the teacher first (:meth:`Method.fit_graph`). The report gives
test accuracy on all test nodes (``accuracy``), the transductive ones and the hidden (inductive) ones, the GNN
evaluated on the whole graph with the hidden nodes restored, and the inference latency of ``eval.latency_nodes``
test nodes: the MLP on their features, the GNN including the fetch of their ``layers``-hop neighbourhood.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from ..config import ALONE, DEFAULT_METHODS, MethodSpec, NamedSpec, StrictModel, TrainSpec, check_kwargs
from ..data.graphs import GRAPHS, GraphData, GraphSplit, load_graph, split_nodes, subgraph
from ..data.lm import IGNORE_INDEX
from ..errors import close_matches
from ..eval.metrics import accuracy, agreement, classification_metrics, latency_ms
from ..eval.report import write_report
from ..exporters.classifier import load_classifier, save_classifier
from ..io import (
    cache_root,
    load_state_dict,
    publish_dir,
    save_state_dict_atomic,
    seed_everything,
    write_json_atomic,
)
from ..models.classifiers import count_params, predict_logits
from ..models.gnn import GraphModel, neighbour_fetch
from ..registry import METHODS, MODELS, TASKS
from ..train.classifier import train_classifier
from ..train.loop import make_accelerator
from .base import RunContext, Task
from .classification import ModelSpec, teacher_fingerprint

_FILE_FIELDS = ("edges", "nodes", "format", "id_column", "source_column", "target_column", "label_column",
                "feature_columns", "features_column", "text_column", "feature_dim", "data_seed")
GNN_FORMAT = "kdistill-gnn/1"


class GraphDataSpec(NamedSpec):
    """A graph from ``GRAPHS`` (``wordnet``) and its keyword arguments, or your own files: ``{edges: ..., nodes:
    ..., label_column: ..., feature_columns | features_column | text_column: ...}`` (the ``files`` graph)."""

    name: str = "wordnet"

    @model_validator(mode="before")
    @classmethod
    def _own_data(cls, v: Any) -> Any:
        if isinstance(v, dict) and ("edges" in v or "nodes" in v) and "name" not in v:
            for key in v:
                if key not in _FILE_FIELDS:
                    near = close_matches(str(key), _FILE_FIELDS)
                    raise ValueError(f"data.{key}: unknown field of your own graph."
                                     + (f" Did you mean {' or '.join(repr(m) for m in near)}?" if near else "")
                                     + f" Expected some of: {', '.join(_FILE_FIELDS)}.")
            return {"name": "files", "kwargs": dict(v)}
        return v

    @model_validator(mode="after")
    def _check(self) -> GraphDataSpec:
        check_kwargs("graph dataset", self.name, GRAPHS.get(self.name), self.kwargs)
        return self


class SplitSpec(StrictModel):
    """Fractions of the labelled nodes; ``inductive_fraction`` of the test nodes hidden during training; ``seed``
    of the draw (default: the run's seed)."""

    train_fraction: float = 0.1
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    inductive_fraction: float = 0.0
    seed: int | None = None


class GNNSpec(StrictModel):
    """The teacher network (:class:`kdistill.models.gnn.GraphModel`)."""

    kind: Literal["gcn", "sage"] = "gcn"
    hidden: int = 128
    layers: int = 2
    dropout: float = 0.5


class GraphTeacherSpec(StrictModel):
    """The GNN teacher, trained full-graph (one batch of all training nodes a step) and cached by fingerprint."""

    model: GNNSpec = GNNSpec()
    train: TrainSpec = TrainSpec(epochs=200, batch_size=1_000_000, lr=0.01, weight_decay=5e-4, eval_every=20)
    reuse: bool = True


class GraphVariantSpec(StrictModel):
    """Another distilled student of the same run (same architecture, data and training budget)."""

    method: MethodSpec


class GraphEvalSpec(StrictModel):
    latency_nodes: int = 1000
    latency_repeats: int = 20


class GraphConfig(StrictModel):
    task: Literal["graph"] = "graph"
    name: str = "graph"
    description: str = ""
    seed: int = 0
    data: GraphDataSpec = GraphDataSpec()
    split: SplitSpec = SplitSpec()
    teacher: GraphTeacherSpec = GraphTeacherSpec()
    student: ModelSpec = ModelSpec(name="mlp", kwargs={"width": 128, "depth": 2})
    method: MethodSpec = Field(default_factory=lambda: MethodSpec(name=DEFAULT_METHODS["graph"]))
    train: TrainSpec = TrainSpec(epochs=50, batch_size=512, lr=5e-3)
    baseline: bool = True
    variants: dict[str, GraphVariantSpec] = {}
    eval: GraphEvalSpec = GraphEvalSpec()

    @model_validator(mode="after")
    def _names(self) -> GraphConfig:
        for name in self.variants:
            if name in ("baseline", "student", "work") or name.startswith("teacher") \
                    or not name.replace("_", "").isalnum():
                raise ValueError(f"variant name {name!r} is reserved or not snake_case; pick e.g. 'soft_labels'")
        return self


# ------------------------------------------------------------------------------------------------ teacher


def _teacher_done(d: Path) -> bool:
    return all((d / f).is_file() for f in ("model.json", "model.safetensors", "history.json"))


def _load_teacher(d: Path) -> tuple[GraphModel, list[dict], float]:
    meta = json.loads((d / "model.json").read_text())
    model = GraphModel(meta["num_features"], meta["num_classes"], **meta["kwargs"])
    model.load_state_dict(load_state_dict(d / "model.safetensors"))
    hist = json.loads((d / "history.json").read_text())
    return model, hist["history"], hist["seconds"]


def _get_teacher(*, fingerprint: str, model_kwargs: dict[str, Any], data: GraphData, edge_index: torch.Tensor,
                 split: GraphSplit, train: TrainSpec, reuse: bool, seed: int, accelerator: Any,
                 ctx: RunContext) -> tuple[GraphModel, list[dict], float, str]:
    """The GNN teacher trained on the visible graph ``edge_index``: from the run folder or the cache when its
    fingerprint matches (and ``reuse``), else trained here and cached."""
    tdir, cached = ctx.output / "teacher", cache_root() / "teachers" / fingerprint
    if _teacher_done(tdir) and json.loads((tdir / "model.json").read_text()).get("fingerprint") == fingerprint \
            and (ctx.resume or reuse):
        return (*_load_teacher(tdir), "reused (run folder)")
    if reuse and _teacher_done(cached):
        if accelerator.is_main_process:
            shutil.copytree(cached, tdir, dirs_exist_ok=True)
        return (*_load_teacher(cached), f"reused (cache {fingerprint})")
    work = ctx.output / "work" / "teacher"
    if work.exists():
        shutil.rmtree(work)
    seed_everything(seed)
    model = GraphModel(data.x.shape[1], data.num_classes, **model_kwargs).set_graph(data.x, edge_index)
    y_val = data.y[split.val]
    res = train_classifier(model, METHODS.get(ALONE)(), split.train, data.y[split.train], accelerator=accelerator,
                           batch_size=min(train.batch_size, len(split.train)), seed=seed,
                           evaluate=lambda m: classification_metrics(m(split.val), y_val), output_dir=work,
                           phase="teacher", progress=ctx.progress,
                           **train.model_dump(exclude={"batch_size", "mixed_precision"}))
    if accelerator.is_main_process:
        save_state_dict_atomic(tdir / "model.safetensors", res.student.state_dict(), metadata={"format": GNN_FORMAT})
        write_json_atomic(tdir / "model.json", {"format": GNN_FORMAT, "kwargs": model_kwargs,
                                                "num_features": int(data.x.shape[1]),
                                                "num_classes": data.num_classes, "params": count_params(model),
                                                "fingerprint": fingerprint})
        write_json_atomic(tdir / "history.json", {"history": res.history, "seconds": res.seconds})
        if reuse:
            publish_dir(tdir, cached)
    accelerator.wait_for_everyone()
    return res.student, res.history, res.seconds, "trained"


@torch.no_grad()
def _teacher_table(teacher: GraphModel, rows: torch.Tensor, layers: tuple[str, ...]):
    """The teacher's logits and ``layers`` outputs of the nodes ``rows`` (one forward on its current graph)."""
    from ..capture import capture
    from ..methods.base import ModelOutput

    teacher.eval()
    with capture(teacher, layers, detach=True) as feats:
        logits = teacher(rows)
    feats = dict(feats)

    def lookup(batch: dict[str, Any]) -> ModelOutput:
        i = batch["index"]
        return ModelOutput(logits=logits.to(i.device)[i], features={k: v.to(i.device)[i] for k, v in feats.items()})

    return lookup, feats


# ------------------------------------------------------------------------------------------------ students


def _phase_done(d: Path) -> bool:
    return all((d / f).is_file() for f in ("model.json", "model.safetensors", "history.json"))


def _train_student(name: str, spec: MethodSpec, *, data: GraphData, split: GraphSplit, observed: torch.Tensor,
                   edge_index: torch.Tensor, teacher: GraphModel, student_spec: ModelSpec, train: TrainSpec,
                   seed: int, accelerator: Any, ctx: RunContext) -> tuple[torch.nn.Module, list[dict], float, dict]:
    """One MLP student on node features: on the labelled train nodes, or on every visible node when the method
    ``trains_on_unlabelled`` (labels ``-100`` on unlabelled nodes), against the teacher's table of those nodes."""
    pdir, work = ctx.output / name, ctx.output / "work" / name
    if ctx.resume and _phase_done(pdir):
        model, _ = load_classifier(pdir)
        hist = json.loads((pdir / "history.json").read_text())
        return model, hist["history"], hist["seconds"], hist.get("graph_fit", {})
    if not ctx.resume and work.exists():
        shutil.rmtree(work)
    method = spec.build()
    rows = torch.nonzero(observed).flatten() if method.trains_on_unlabelled else split.train
    labels = torch.full_like(data.y, IGNORE_INDEX)
    labels[split.train] = data.y[split.train]
    targets, graph_fit = None, {}
    if method.needs_teacher:
        targets, feats = _teacher_table(teacher, rows, method.teacher_layers)
        keep = torch.zeros(data.num_nodes, dtype=torch.bool)
        keep[rows] = True
        graph_fit = method.fit_graph(teacher_features=feats, node_features=data.x[rows],
                                     edge_index=subgraph(edge_index, keep, relabel=True), seed=seed)
    seed_everything(seed)  # every student starts from the same weights
    model = MODELS.get(student_spec.name)((data.x.shape[1],), data.num_classes, **student_spec.kwargs)
    x_val, y_val = data.x[split.val], data.y[split.val]
    res = train_classifier(model, method, data.x[rows], labels[rows], accelerator=accelerator,
                           batch_size=train.batch_size, seed=seed, teacher_targets=targets,
                           evaluate=lambda m: classification_metrics(predict_logits(m, x_val), y_val),
                           output_dir=work, resume=ctx.resume, phase=name, progress=ctx.progress,
                           **train.model_dump(exclude={"batch_size", "mixed_precision"}))
    if accelerator.is_main_process:
        save_classifier(pdir, res.student, model_name=student_spec.name, model_kwargs=student_spec.kwargs,
                        input_shape=(int(data.x.shape[1]),), num_classes=data.num_classes,
                        extra={"phase": name, "method": spec.model_dump(), "class_names": data.class_names})
        write_json_atomic(pdir / "history.json", {"history": res.history, "seconds": res.seconds,
                                                  "steps": res.steps, "train_nodes": len(rows),
                                                  "graph_fit": graph_fit})
    accelerator.wait_for_everyone()
    return res.student, res.history, res.seconds, graph_fit


# ------------------------------------------------------------------------------------------------ run


def _node_metrics(logits: torch.Tensor, y: torch.Tensor, hidden: torch.Tensor) -> dict[str, float]:
    """Test metrics of all test nodes, plus accuracy on the transductive (``~hidden``) and inductive ones."""
    out = classification_metrics(logits, y)
    for key, mask in (("accuracy_transductive", ~hidden), ("accuracy_inductive", hidden)):
        if mask.any():
            out[key] = accuracy(logits[mask], y[mask])
    return out


def run_graph(cfg: GraphConfig, ctx: RunContext) -> dict[str, Any]:
    t_start = time.perf_counter()
    ctx.output.mkdir(parents=True, exist_ok=True)
    data = load_graph(cfg.data.name, **cfg.data.kwargs)
    split_seed = cfg.seed if cfg.split.seed is None else cfg.split.seed
    split = split_nodes(data.y, seed=split_seed, **cfg.split.model_dump(exclude={"seed"}))
    observed = split.observed(data.num_nodes)
    visible = subgraph(data.edge_index, observed)  # hidden test nodes lose their edges while training
    MODELS.get(cfg.student.name)((data.x.shape[1],), data.num_classes, **cfg.student.kwargs)  # fails now, not later
    accelerator = make_accelerator(cfg.train.mixed_precision)

    model_kwargs = cfg.teacher.model.model_dump()
    fp = teacher_fingerprint(data={"data": cfg.data.model_dump(), "split": {**cfg.split.model_dump(),
                                                                          "seed": split_seed}},
                             model=model_kwargs, train=cfg.teacher.train.model_dump(), seed=cfg.seed)
    teacher, teacher_hist, teacher_secs, source = _get_teacher(
        fingerprint=fp, model_kwargs=model_kwargs, data=data, edge_index=visible, split=split,
        train=cfg.teacher.train, reuse=cfg.teacher.reuse, seed=cfg.seed, accelerator=accelerator, ctx=ctx)
    teacher.eval().set_graph(data.x, visible)

    phases = ([("baseline", MethodSpec(name=ALONE))] if cfg.baseline else []) + [("student", cfg.method)]
    phases += [(n, v.method) for n, v in cfg.variants.items()]
    trained = {name: _train_student(name, spec, data=data, split=split, observed=observed, edge_index=visible,
                                    teacher=teacher, student_spec=cfg.student, train=cfg.train, seed=cfg.seed,
                                    accelerator=accelerator, ctx=ctx)
               for name, spec in phases}

    # ---- evaluation: the GNN on the whole graph (hidden nodes and their edges restored), MLPs on features
    teacher.set_graph(data.x, data.edge_index)
    test, y_test = split.test, data.y[split.test]
    hidden = torch.isin(test, split.hidden)
    t_logits = predict_logits(teacher, test, batch_size=max(1, len(test)))
    g = torch.Generator().manual_seed(cfg.seed)
    lat_idx = test[torch.randperm(len(test), generator=g)[:cfg.eval.latency_nodes]]
    reps = cfg.eval.latency_repeats
    with torch.no_grad():
        gnn_ms = latency_ms(lambda: teacher.predict_nodes(lat_idx, data.x, data.edge_index), repeats=reps)
        fetch_ms = latency_ms(lambda: neighbour_fetch(lat_idx, teacher.layers, data.x, data.edge_index), repeats=reps)
    student_model = trained["student"][0].eval()
    mlp_ms = latency_ms(lambda: student_model(data.x[lat_idx]), repeats=reps)

    def entry(name: str) -> dict[str, Any]:
        model, _, secs, graph_fit = trained[name]
        logits = predict_logits(model, data.x[test])
        out = {"params": count_params(model), "metrics": _node_metrics(logits, y_test, hidden), "train_seconds": secs,
               "agreement": agreement(logits, t_logits)}
        return {**out, "graph_fit": graph_fit} if graph_fit else out

    teacher_entry = {"params": count_params(teacher), "model": model_kwargs, "source": source,
                     "train_seconds": teacher_secs, "metrics": _node_metrics(t_logits, y_test, hidden),
                     "latency_ms": gnn_ms, "latency_fetch_ms": fetch_ms}
    student_entry = {**entry("student"), "latency_ms": mlp_ms, "model": cfg.student.model_dump()}
    report: dict[str, Any] = {
        "recipe": cfg.name, "task": "graph", "method": cfg.method.name, "seed": cfg.seed,
        "data": {**data.summary(), **split.summary(), "visible_edges": int(visible.shape[1]) // 2},
        "teacher": teacher_entry, "student": student_entry, "agreement": student_entry["agreement"], "variants": {},
        "latency_nodes": int(len(lat_idx)),
    }
    if cfg.baseline:
        report["baseline"] = entry("baseline")
    for name, v in cfg.variants.items():
        report["variants"][name] = {**entry(name), "method": v.method.model_dump()}
    report["wall_seconds"] = time.perf_counter() - t_start
    curves = {"teacher": teacher_hist, **{("student: " + cfg.method.name if n == "student" else n): trained[n][1]
                                          for n in trained}}
    if accelerator.is_main_process:
        write_report(report, ctx.output, curves=curves, extra_md=_settings_md(report))
    return report


def _settings_md(report: dict[str, Any]) -> str:
    """The report's graph section: accuracy on transductive and inductive test nodes, and serving latency."""
    rows = [("teacher (GNN)", report["teacher"])]
    if report.get("baseline"):
        rows.append(("MLP alone", report["baseline"]))
    rows.append((f"MLP + {report['method']}", report["student"]))
    rows += [(f"MLP + {v['method']['name']} ({n})", v) for n, v in report["variants"].items()]

    def cell(m: dict[str, Any], key: str) -> str:
        return f"{m[key]:.4f}" if key in m else "—"

    d = report["data"]
    lines = ["## Test nodes by setting", "",
             f"{d['test_transductive']} transductive test nodes (visible with their edges during training), "
             f"{d['test_inductive']} inductive ones (hidden with their edges; the GNN sees them at test time).", "",
             "| model | all test | transductive | inductive |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {cell(e['metrics'], 'accuracy')} | {cell(e['metrics'], 'accuracy_transductive')} | "
              f"{cell(e['metrics'], 'accuracy_inductive')} |" for n, e in rows]
    t, s = report["teacher"], report["student"]
    lines += ["", f"## Inference latency ({report['latency_nodes']} test nodes, median)", "",
              f"- GNN with the neighbour fetch: {t['latency_ms']:.2f} ms (of which fetching the "
              f"{t['model']['layers']}-hop subgraph: {t['latency_fetch_ms']:.2f} ms)",
              f"- MLP on the nodes' features: {s['latency_ms']:.3f} ms ({t['latency_ms'] / s['latency_ms']:.0f}x "
              "faster)"]
    return "\n".join(lines)


TASKS.register("graph")(Task("graph", GraphConfig, run_graph,
                             "GNN teacher (GCN / GraphSAGE) -> MLP on node features, transductive and inductive"))
