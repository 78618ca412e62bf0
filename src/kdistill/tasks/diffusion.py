"""Task ``diffusion``: a many-step, class-conditional diffusion teacher distilled into a student that samples in 1-4
steps, compared with the teacher itself sampled in as few steps (the naive baseline).

The teacher (a v-prediction denoiser, :mod:`kdistill.models.diffusion`) trains here on the data with the objective
``config.DENOISING`` names (labels dropped to the null class now and then, so it can be guided) and is cached by
fingerprint like the classification teacher. Each student starts as a copy of the teacher (or, with ``student:``
set, a fresh network of that family) and trains with its method against the teacher sampled with classifier-free
guidance of ``guidance_scale``; a method may split its run into stages (:meth:`Method.diffusion_stages`, e.g.
halving the steps with the previous stage's student as the teacher), trained on equal shares of ``train.max_steps``.

Evaluation uses a fixed set of noises and balanced labels for every row: the teacher at ``eval.teacher_steps`` (the
reference) and at each of ``eval.steps``, and every student at each of ``eval.steps`` with its method's sampler. A
classifier trained here on the data (the evaluator, cached) gives the features of a Fréchet distance to the test
set (``fid``; raw coordinates for 2-D data), improved precision and recall, and the class accuracy of the samples;
``mse_to_teacher`` is the mean squared distance to the reference teacher's samples from the same noise, and
``ms_per_sample`` the sampling latency. Grids (or scatter plots) of every row go into the run folder and report.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..capture import capture
from ..config import ALONE, DEFAULT_METHODS, DENOISING, MethodSpec, NamedSpec, StrictModel, TrainSpec, check_kwargs
from ..data.generative import GENERATIVE, GenerativeData, load_generative
from ..data.loaders import TensorDictDataset, make_loader
from ..errors import KDistillError
from ..eval.generative import frechet_distance, precision_recall, sample_grid_png
from ..eval.metrics import classification_metrics, latency_ms
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
from ..methods.base import Method, ModelOutput
from ..models.classifiers import count_params, predict_logits
from ..models.diffusion import SAMPLERS, DiffusionSchedule, guided, sample
from ..registry import METHODS, MODELS, TASKS
from ..train.classifier import train_classifier
from ..train.loop import fit, make_accelerator
from .base import RunContext, Task
from .classification import ModelSpec, teacher_fingerprint

DENOISER_FORMAT = "kdistill-denoiser/1"


class DiffusionDataSpec(NamedSpec):
    """A dataset from ``GENERATIVE`` (``fashion_mnist``, ``two_moons``, ``ring``) and its keyword arguments."""

    name: str = "fashion_mnist"

    @model_validator(mode="after")
    def _check(self) -> DiffusionDataSpec:
        check_kwargs("generative dataset", self.name, GENERATIVE.get(self.name), self.kwargs)
        return self


class ScheduleSpec(StrictModel):
    """The noise schedule (:class:`kdistill.models.diffusion.DiffusionSchedule`)."""

    num_timesteps: int = 1000
    kind: Literal["cosine", "linear"] = "cosine"


class DiffusionTeacherSpec(StrictModel):
    """The teacher denoiser, trained here with the objective ``config.DENOISING`` names; cached by fingerprint."""

    model: ModelSpec = ModelSpec(name="unet_denoiser", kwargs={"widths": [16, 32, 64]})
    train: TrainSpec = TrainSpec(epochs=1000, max_steps=5000, batch_size=128, lr=2e-3, warmup_steps=100,
                                 max_grad_norm=1.0, log_every=100, checkpoint_every=500)
    label_dropout: float = 0.1
    reuse: bool = True
    #: the teacher's own seed, apart from the run's: students of several seeds share one teacher
    seed: int = 0


class EvaluatorSpec(StrictModel):
    """The classifier trained here on the data that scores samples: its ``features`` (``"classifier"``: the
    penultimate layer ``feature_layer``; ``"raw"``: the samples themselves, for 2-D data) and class accuracy."""

    model: ModelSpec = ModelSpec(name="cnn", kwargs={"width": 32, "depth": 3})
    train: TrainSpec = TrainSpec(epochs=3, batch_size=256, lr=2e-3)
    features: Literal["classifier", "raw"] = "classifier"
    feature_layer: str = "embed"


class DiffusionVariantSpec(StrictModel):
    """Another distilled student of the same run (same start, data and step budget)."""

    method: MethodSpec


class DiffusionEvalSpec(StrictModel):
    samples: int = 1000
    steps: list[int] = [1, 2, 4]
    teacher_steps: int = 50
    precision_recall_k: int = 3
    batch_size: int = 250
    grid_per_class: int = 8
    latency_batch: int = 64
    latency_repeats: int = 5


class DiffusionConfig(StrictModel):
    task: Literal["diffusion"] = "diffusion"
    name: str = "diffusion"
    description: str = ""
    seed: int = 0
    data: DiffusionDataSpec = DiffusionDataSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    guidance_scale: float = 2.0
    teacher: DiffusionTeacherSpec = DiffusionTeacherSpec()
    #: None: the teacher's network, starting from its weights; else a fresh network of this family
    student: ModelSpec | None = None
    method: MethodSpec = Field(default_factory=lambda: MethodSpec(name=DEFAULT_METHODS["diffusion"]))
    train: TrainSpec = TrainSpec(epochs=1000, max_steps=1000, batch_size=64, lr=1e-4, max_grad_norm=1.0,
                                 log_every=50, checkpoint_every=100)
    variants: dict[str, DiffusionVariantSpec] = {}
    evaluator: EvaluatorSpec = EvaluatorSpec()
    eval: DiffusionEvalSpec = DiffusionEvalSpec()

    @model_validator(mode="after")
    def _check(self) -> DiffusionConfig:
        for name in self.variants:
            if name in ("student", "work", "evaluator") or name.startswith("teacher") \
                    or not name.replace("_", "").isalnum():
                raise ValueError(f"variant name {name!r} is reserved or not snake_case; pick e.g. 'progressive'")
        if self.train.max_steps is None:
            raise ValueError("train.max_steps: a diffusion student trains for a number of optimizer steps; set it "
                             "(e.g. 1000)")
        if not self.eval.steps or min(self.eval.steps) < 1:
            raise ValueError(f"eval.steps: got {self.eval.steps}, expected sampling step counts >= 1, e.g. [1, 2, 4]")
        if self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale: got {self.guidance_scale}, expected >= 1 (1: no guidance)")
        return self


# ------------------------------------------------------------------------------------------------ networks


class _Guided(nn.Module):
    """The teacher as its students see it: no gradients, classifier-free guidance of ``scale`` (a per-call
    ``guidance_scale`` overrides it; ``scale=None``: an unguided network, e.g. a previous stage's student)."""

    def __init__(self, net: nn.Module, scale: float | None, null_class: int) -> None:
        super().__init__()
        self.net, self.scale, self.null_class = net, scale, null_class

    @torch.no_grad()
    def forward(self, z: Tensor, t: Tensor, y: Tensor, guidance_scale: float | Tensor | None = None) -> Tensor:
        if self.scale is None:
            return self.net(z, t, y)
        return guided(self.net, z, t, y, self.scale if guidance_scale is None else guidance_scale, self.null_class)


def _net_output(model: nn.Module, batch: dict[str, Any]) -> ModelOutput:
    """The forward of both models in the loop: the network itself, which the method calls as often as it needs."""
    return ModelOutput(logits=None, extra={"net": model})


def _done(d: Path) -> bool:
    return all((d / f).is_file() for f in ("model.json", "model.safetensors", "history.json"))


def _save_denoiser(d: Path, model: nn.Module, *, spec: ModelSpec, data: GenerativeData, extra: dict[str, Any],
                   history: dict[str, Any]) -> None:
    save_classifier(d, model, model_name=spec.name, model_kwargs=spec.kwargs, input_shape=data.sample_shape,
                    num_classes=data.num_classes, extra={"denoiser_format": DENOISER_FORMAT, **extra})
    write_json_atomic(d / "history.json", history)


def _get_teacher(cfg: DiffusionConfig, data: GenerativeData, schedule: DiffusionSchedule, accelerator: Any,
                 ctx: RunContext) -> tuple[nn.Module, dict[str, Any], str, str]:
    """The teacher denoiser, its history, where it came from and its fingerprint: from the run folder or the cache
    when its fingerprint matches, else trained here."""
    spec = cfg.teacher
    fp = teacher_fingerprint(data=cfg.data.model_dump(), model=spec.model.model_dump(),
                             train={**spec.train.model_dump(), "label_dropout": spec.label_dropout,
                                    "schedule": cfg.schedule.model_dump(), "objective": DENOISING}, seed=spec.seed)
    tdir, cached = ctx.output / "teacher", cache_root() / "teachers" / fp
    for src, label in ((tdir, "reused (run folder)"), (cached, f"reused (cache {fp})")):
        if (spec.reuse or (ctx.resume and src == tdir)) and _done(src) \
                and json.loads((src / "model.json").read_text()).get("fingerprint") == fp:
            model, _ = load_classifier(src)
            if src != tdir and accelerator.is_main_process:
                shutil.copytree(src, tdir, dirs_exist_ok=True)
            return model, json.loads((src / "history.json").read_text()), label, fp
    seed_everything(spec.seed)
    model = MODELS.get(spec.model.name)(data.sample_shape, data.num_classes, **spec.model.kwargs)
    method = METHODS.get(DENOISING)(label_dropout=spec.label_dropout)
    method.prepare_diffusion(student=model, teacher=model, schedule=schedule, guidance_scale=1.0,
                             null_class=data.num_classes, sample_shape=data.sample_shape,
                             num_classes=data.num_classes, seed=spec.seed)
    loader = make_loader(TensorDictDataset(inputs=data.x_train, labels=data.y_train), spec.train.batch_size,
                         seed=spec.seed, drop_last=True)
    res = fit(student=model, method=method, train_loader=loader, accelerator=accelerator,
              student_forward=_net_output, output_dir=ctx.output / "work" / "teacher", resume=ctx.resume,
              phase="teacher", progress=ctx.progress,
              seed=spec.seed, **spec.train.model_dump(exclude={"batch_size", "mixed_precision"}))
    history = {"seconds": res.seconds, "steps": res.steps}
    if accelerator.is_main_process:
        _save_denoiser(tdir, res.student, spec=spec.model, data=data, history=history,
                       extra={"fingerprint": fp, "schedule": schedule.settings(), "role": "teacher",
                              "class_names": data.class_names})
        if spec.reuse:
            publish_dir(tdir, cached)
    accelerator.wait_for_everyone()
    return res.student, history, "trained", fp


def _get_evaluator(cfg: DiffusionConfig, data: GenerativeData, accelerator: Any,
                   ctx: RunContext) -> tuple[nn.Module, dict[str, float], str]:
    """The classifier that scores samples, trained on the training data (cached by fingerprint); its test metrics and
    fingerprint."""
    spec = cfg.evaluator
    fp = teacher_fingerprint(data=cfg.data.model_dump(), model=spec.model.model_dump(),
                             train={**spec.train.model_dump(), "role": "diffusion evaluator"}, seed=0)
    edir, cached = ctx.output / "evaluator", cache_root() / "evaluators" / fp
    for src in (edir, cached):
        if _done(src) and json.loads((src / "model.json").read_text()).get("fingerprint") == fp:
            model, _ = load_classifier(src)
            if src != edir and accelerator.is_main_process:
                shutil.copytree(src, edir, dirs_exist_ok=True)
            return model.eval(), json.loads((src / "history.json").read_text())["test"], fp
    seed_everything(0)
    model = MODELS.get(spec.model.name)(data.sample_shape, data.num_classes, **spec.model.kwargs)
    res = train_classifier(model, METHODS.get(ALONE)(), data.x_train, data.y_train, accelerator=accelerator,
                           batch_size=spec.train.batch_size, seed=0, phase="evaluator", progress=ctx.progress,
                           output_dir=ctx.output / "work" / "evaluator",
                           **spec.train.model_dump(exclude={"batch_size", "mixed_precision"}))
    model = res.student.eval()
    test = classification_metrics(predict_logits(model, data.x_test), data.y_test)
    if accelerator.is_main_process:
        save_classifier(edir, model, model_name=spec.model.name, model_kwargs=spec.model.kwargs,
                        input_shape=data.sample_shape, num_classes=data.num_classes,
                        extra={"fingerprint": fp, "role": "evaluator"})
        write_json_atomic(edir / "history.json", {"seconds": res.seconds, "test": test})
        publish_dir(edir, cached)
    accelerator.wait_for_everyone()
    return model, test, fp


# ------------------------------------------------------------------------------------------------ students


def _train_student(name: str, spec: MethodSpec, *, cfg: DiffusionConfig, data: GenerativeData, teacher: nn.Module,
                   schedule: DiffusionSchedule, accelerator: Any, ctx: RunContext) -> tuple[nn.Module, Method, dict]:
    """One student: a copy of the teacher (or a fresh ``cfg.student``), trained stage by stage with ``spec``'s
    method. A finished stage leaves the student's and the method's weights in ``<name>/stages/<stage>``, so a resumed
    run continues at the first unfinished stage (and inside it from its last checkpoint)."""
    pdir = ctx.output / name
    method = spec.build()
    if ctx.resume and _done(pdir):
        model, _ = load_classifier(pdir)
        return model, method, json.loads((pdir / "history.json").read_text())
    work = ctx.output / "work" / name
    if not ctx.resume and work.exists():
        shutil.rmtree(work)
    seed_everything(cfg.seed)  # every student starts from the same weights and draws the same first noise
    student_spec = cfg.student or cfg.teacher.model
    if cfg.student is None:
        student = copy.deepcopy(teacher).train().requires_grad_(True)
    else:
        student = MODELS.get(student_spec.name)(data.sample_shape, data.num_classes, **student_spec.kwargs)
    null = data.num_classes
    prep = method.prepare_diffusion(student=student, teacher=teacher, schedule=schedule,
                                    guidance_scale=cfg.guidance_scale, null_class=null,
                                    sample_shape=data.sample_shape, num_classes=data.num_classes, seed=cfg.seed)
    stages = method.diffusion_stages()
    if not stages:
        raise KDistillError(f"method {spec.name!r} declares no diffusion stages; expected at least one")
    per_stage = math.ceil(cfg.train.max_steps / len(stages))
    loader = make_loader(TensorDictDataset(inputs=data.x_train, labels=data.y_train), cfg.train.batch_size,
                         seed=cfg.seed, drop_last=True)
    history: dict[str, Any] = {"stages": [], "seconds": 0.0, "steps": 0, "prepare": prep}
    previous: nn.Module | None = None
    for i, stage in enumerate(stages):
        sdir = work / "stages" / f"{i:02d}_{stage.name}"
        method.set_diffusion_stage(i)
        if stage.teacher == "previous" and previous is not None:
            stage_teacher = _Guided(previous, None, null)
        elif stage.teacher in ("teacher", "previous"):
            stage_teacher = _Guided(teacher, cfg.guidance_scale, null)
        else:
            raise KDistillError(f"method {spec.name!r}: stage {stage.name!r} has teacher {stage.teacher!r}; expected "
                                "'teacher' or 'previous'")
        if (sdir / "done.json").is_file():
            student.load_state_dict(load_state_dict(sdir / "student.safetensors"))
            method.load_state_dict(load_state_dict(sdir / "method.safetensors"))
            row = json.loads((sdir / "done.json").read_text())
        else:
            method.set_total_steps(per_stage)
            res = fit(student=student, method=method, teacher=stage_teacher, train_loader=loader,
                      accelerator=accelerator, student_forward=_net_output, teacher_forward=_net_output,
                      output_dir=sdir, resume=ctx.resume, phase=f"{name}/{stage.name}", progress=ctx.progress,
                      seed=cfg.seed + i, on_step=lambda step, model: method.after_optimizer_step(model),
                      **{**cfg.train.model_dump(exclude={"batch_size", "mixed_precision"}), "max_steps": per_stage})
            student = res.student
            row = {"stage": stage.name, "teacher": stage.teacher, "steps": res.steps, "seconds": res.seconds}
            if accelerator.is_main_process:
                save_state_dict_atomic(sdir / "student.safetensors", student.state_dict())
                save_state_dict_atomic(sdir / "method.safetensors",
                                       {k: v.contiguous() for k, v in method.state_dict().items()})
                write_json_atomic(sdir / "done.json", row)
            accelerator.wait_for_everyone()
        history["stages"].append(row)
        history["seconds"] += row["seconds"]
        history["steps"] += row["steps"]
        previous = copy.deepcopy(student).eval().requires_grad_(False)
    if accelerator.is_main_process:
        _save_denoiser(pdir, student, spec=student_spec, data=data, history=history,
                       extra={"role": name, "method": spec.model_dump(), "schedule": schedule.settings(),
                              "sampler": method.diffusion_sampler, "guidance_baked_in": cfg.guidance_scale,
                              "class_names": data.class_names})
    accelerator.wait_for_everyone()
    return student, method, history


# ------------------------------------------------------------------------------------------------ evaluation


def _features(evaluator: nn.Module, x: Tensor, *, kind: str, layer: str, batch_size: int) -> tuple[Tensor, Tensor]:
    """(features, logits) of samples ``x``: the evaluator's ``layer`` output (or ``x`` itself) and its logits."""
    feats, logits = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            chunk = x[i:i + batch_size]
            with capture(evaluator, (layer,) if kind == "classifier" else (), detach=True) as f:
                logits.append(evaluator(chunk))
            feats.append(f[layer].flatten(1) if kind == "classifier" else chunk.flatten(1))
    return torch.cat(feats), torch.cat(logits)


def _generate(net: Any, schedule: DiffusionSchedule, *, sampler: str, steps: int, noise: Tensor, labels: Tensor,
              seed: int, batch_size: int) -> Tensor:
    out = []
    g = torch.Generator().manual_seed(seed + 17)
    for i in range(0, len(noise), batch_size):
        out.append(sample(net, schedule, sampler=sampler, steps=steps, noise=noise[i:i + batch_size],
                          labels=labels[i:i + batch_size], generator=g))
    return torch.cat(out)


def _score(x: Tensor, labels: Tensor, *, reference: Tensor | None, real_feats: Tensor, evaluator: nn.Module,
           cfg: DiffusionConfig) -> dict[str, float]:
    ev = cfg.evaluator
    feats, logits = _features(evaluator, x, kind=ev.features, layer=ev.feature_layer, batch_size=cfg.eval.batch_size)
    out = {"fid": frechet_distance(feats.numpy(), real_feats.numpy()),
           **precision_recall(real_feats[:len(feats)], feats, k=cfg.eval.precision_recall_k),
           "accuracy": float((logits.argmax(-1) == labels).float().mean())}
    if reference is not None:
        out["mse_to_teacher"] = float((x - reference).pow(2).flatten(1).mean(1).mean())
    return out


def run_diffusion(cfg: DiffusionConfig, ctx: RunContext) -> dict[str, Any]:
    t_start = time.perf_counter()
    ctx.output.mkdir(parents=True, exist_ok=True)
    data = load_generative(cfg.data.name, **cfg.data.kwargs)
    schedule = DiffusionSchedule(**cfg.schedule.model_dump())
    accelerator = make_accelerator(cfg.train.mixed_precision)
    for spec in [cfg.method, *(v.method for v in cfg.variants.values())]:
        sampler = spec.method_class.diffusion_sampler
        if sampler not in SAMPLERS:  # a method declaring a sampler that does not exist fails now, not after training
            raise KDistillError(f"method {spec.name!r} declares diffusion_sampler {sampler!r}; expected one of "
                                f"{sorted(SAMPLERS)}")
    teacher, teacher_hist, source, teacher_fp = _get_teacher(cfg, data, schedule, accelerator, ctx)
    teacher.eval().requires_grad_(False)
    evaluator, evaluator_test, evaluator_fp = _get_evaluator(cfg, data, accelerator, ctx)

    phases = [("student", cfg.method)] + [(n, v.method) for n, v in cfg.variants.items()]
    trained = {name: _train_student(name, spec, cfg=cfg, data=data, teacher=teacher, schedule=schedule,
                                    accelerator=accelerator, ctx=ctx) for name, spec in phases}

    # ---- evaluation: one set of noises and balanced labels for every row
    e = cfg.eval
    g = torch.Generator().manual_seed(cfg.seed + 1000)
    noise = torch.randn((e.samples, *data.sample_shape), generator=g)
    labels = torch.arange(e.samples) % data.num_classes
    real = data.x_test[torch.randperm(len(data.x_test), generator=g)[:max(e.samples, 2)]]
    real_feats, _ = _features(evaluator, real, kind=cfg.evaluator.features, layer=cfg.evaluator.feature_layer,
                              batch_size=e.batch_size)
    teacher_net = _Guided(teacher, cfg.guidance_scale, data.num_classes)
    lat_noise, lat_labels = noise[:e.latency_batch], labels[:e.latency_batch]

    # grid titles: the teacher, or the method that trained each student
    labels_of = {"teacher": "teacher", "student": cfg.method.name,
                 **{n: f"{v.method.name} ({n})" for n, v in cfg.variants.items()}}

    def row(net: Any, sampler: str, steps: int, tag: str, reference: Tensor | None) -> tuple[dict[str, float], Tensor]:
        x = _generate(net, schedule, sampler=sampler, steps=steps, noise=noise, labels=labels, seed=cfg.seed,
                      batch_size=e.batch_size)
        metrics = _score(x, labels, reference=reference, real_feats=real_feats, evaluator=evaluator, cfg=cfg)
        ms = latency_ms(lambda: sample(net, schedule, sampler=sampler, steps=steps, noise=lat_noise,
                                       labels=lat_labels), repeats=e.latency_repeats, warmup=1)
        metrics["ms_per_sample"] = ms / len(lat_noise)
        if accelerator.is_main_process:
            sample_grid_png(x, labels, ctx.output / "samples" / f"{tag}.png", class_names=data.class_names,
                            title=f"{labels_of.get(tag.rsplit('_', 2)[0], tag)}, {steps} step{'s' * (steps > 1)}",
                            image=data.image, per_class=e.grid_per_class)
        return metrics, x

    # The teacher's rows depend only on the teacher, the evaluator, the guidance and the eval settings: computed once
    # and cached, so runs of other methods or students on the same teacher reuse them (and its reference samples).
    tkey = teacher_fingerprint(data={"teacher": teacher_fp, "evaluator": evaluator_fp},
                               model={"guidance_scale": cfg.guidance_scale, "features": cfg.evaluator.features,
                                      "feature_layer": cfg.evaluator.feature_layer},
                               train=e.model_dump(exclude={"grid_per_class"}), seed=cfg.seed)
    tcache = cache_root() / "diffusion_eval" / tkey
    tags = [f"teacher_{e.teacher_steps}_steps"] + [f"teacher_{n}_steps" for n in e.steps]
    if (tcache / "rows.json").is_file() and (tcache / "reference.safetensors").is_file():
        rows = json.loads((tcache / "rows.json").read_text())
        ref_metrics, naive = rows["reference"], rows["naive"]
        reference = load_state_dict(tcache / "reference.safetensors")["samples"]
        if accelerator.is_main_process:
            for tag in tags:
                if (tcache / f"{tag}.png").is_file():
                    (ctx.output / "samples").mkdir(parents=True, exist_ok=True)
                    shutil.copy2(tcache / f"{tag}.png", ctx.output / "samples" / f"{tag}.png")
    else:
        ref_metrics, reference = row(teacher_net, "ddim", e.teacher_steps, tags[0], None)
        naive = {str(n): row(teacher_net, "ddim", n, f"teacher_{n}_steps", reference)[0] for n in e.steps}
        if accelerator.is_main_process:
            tcache.mkdir(parents=True, exist_ok=True)
            save_state_dict_atomic(tcache / "reference.safetensors", {"samples": reference.contiguous()})
            for tag in tags:
                shutil.copy2(ctx.output / "samples" / f"{tag}.png", tcache / f"{tag}.png")
            write_json_atomic(tcache / "rows.json", {"reference": ref_metrics, "naive": naive})

    def entry(name: str) -> dict[str, Any]:
        model, method, hist = trained[name]
        model.eval()
        by_steps = {}
        for n in e.steps:
            if method.diffusion_sampler == "noise_to_data" and n != 1:
                continue  # a one-step generator has no multi-step sampler
            by_steps[str(n)] = row(model, method.diffusion_sampler, n, f"{name}_{n}_steps", reference)[0]
        first = by_steps[min(by_steps, key=int)]
        return {"params": count_params(model), "metrics": first, "by_steps": by_steps,
                "sampler": method.diffusion_sampler, "train_seconds": hist["seconds"], "train_steps": hist["steps"],
                "stages": hist["stages"], **({"prepare": hist["prepare"]} if hist.get("prepare") else {})}

    student_entry = entry("student")
    report: dict[str, Any] = {
        "recipe": cfg.name, "task": "diffusion", "method": cfg.method.name, "seed": cfg.seed,
        "data": data.summary(), "guidance_scale": cfg.guidance_scale, "schedule": schedule.settings(),
        "teacher": {"params": count_params(teacher), "model": cfg.teacher.model.model_dump(), "source": source,
                    "train_seconds": teacher_hist["seconds"], "steps": e.teacher_steps, "metrics": ref_metrics,
                    "latency_ms": ref_metrics["ms_per_sample"], "by_steps": naive},
        "baseline": {"description": "the teacher sampled in as few steps", "metrics": naive[str(min(e.steps))],
                     "by_steps": naive},
        "student": {**student_entry, "latency_ms": student_entry["metrics"]["ms_per_sample"]},
        "variants": {n: {**entry(n), "method": v.method.model_dump()} for n, v in cfg.variants.items()},
        "evaluator": {"params": count_params(evaluator), "test": evaluator_test, "features": cfg.evaluator.features},
        "eval": e.model_dump(),
    }
    report["wall_seconds"] = time.perf_counter() - t_start
    if accelerator.is_main_process:
        write_report(report, ctx.output, metric="fid", extra_md=_steps_md(report))
    return report


def _steps_md(report: dict[str, Any]) -> str:
    """The report's table: every model at every step count, with its sample grid."""
    t = report["teacher"]
    rows = [(f"teacher ({t['steps']} steps, reference)", t["steps"], t["metrics"], f"teacher_{t['steps']}_steps")]
    rows += [("teacher (naive)", int(n), m, f"teacher_{n}_steps") for n, m in t["by_steps"].items()]
    for name, ent in [("student", report["student"]), *report["variants"].items()]:
        label = report["method"] if name == "student" else f"{ent['method']['name']} ({name})"
        rows += [(label, int(n), m, f"{name}_{n}_steps") for n, m in ent["by_steps"].items()]

    def f(m: dict[str, float], k: str, fmt: str) -> str:
        return format(m[k], fmt) if k in m else "—"

    lines = ["## Samples by step count", "",
             f"Guidance scale {report['guidance_scale']}; {report['eval']['samples']} samples per row from the same "
             "noises and balanced labels; FID-like: Fréchet distance on the evaluator's features (lower is better); "
             "accuracy: the evaluator's class accuracy on the samples (its test accuracy: "
             f"{report['evaluator']['test']['accuracy']:.3f}).", "",
             "| model | steps | FID-like | precision | recall | class accuracy | MSE to teacher | ms / sample |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {label} | {n} | {f(m, 'fid', '.3f')} | {f(m, 'precision', '.3f')} | {f(m, 'recall', '.3f')} | "
              f"{f(m, 'accuracy', '.3f')} | {f(m, 'mse_to_teacher', '.4f')} | {f(m, 'ms_per_sample', '.3f')} |"
              for label, n, m, _ in rows]
    lines += ["", "## Sample grids", ""]
    lines += [f"![{label}, {n} steps](samples/{tag}.png)" for label, n, _, tag in rows]
    return "\n".join(lines)


TASKS.register("diffusion")(Task("diffusion", DiffusionConfig, run_diffusion,
                                 "many-step diffusion teacher -> 1-4 step student (step distillation)"))
