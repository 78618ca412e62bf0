"""Run configuration: YAML -> pydantic models (validated, with defaults) -> flat keyword arguments.

Each task (``classification``, ``llm``, ``embedding``, ``blackbox``) registers its own pydantic schema in
``TASKS``; the shared pieces (model / method / training specs) live here. No class reads a config
object: runners turn specs into keyword arguments (``spec.kwargs``) for constructors.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from .errors import ConfigError, close_matches
from .registry import AUGMENTS, METHODS, TASKS


class StrictModel(BaseModel):
    """Base for every config section: unknown fields are errors (with close matches)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def check_kwargs(kind: str, name: str, factory: Callable[..., Any], kwargs: Mapping[str, Any],
                 provided: Sequence[str] = ()) -> None:
    """Check ``kwargs`` against ``factory``'s signature: unknown names (with close matches) and missing
    required arguments fail here, before anything is built. ``provided`` names are filled in later by
    the runner (e.g. ``input_shape``, ``num_classes``)."""
    sig = inspect.signature(factory)
    params = {n: p for n, p in sig.parameters.items() if n != "self"}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    allowed = [n for n, p in params.items() if p.kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                               inspect.Parameter.VAR_KEYWORD)]
    for key in kwargs:
        if key in provided:
            raise ConfigError(f"{kind} {name!r}: argument {key!r} is set by kdistill itself; "
                              "remove it from the recipe.")
        if key not in params and not accepts_any:
            m = close_matches(key, [a for a in allowed if a not in provided])
            hint = f" Did you mean {' or '.join(repr(x) for x in m)}?" if m else ""
            raise ConfigError(
                f"{kind} {name!r} got an unknown argument {key!r}.{hint} Expected some of: "
                f"{', '.join(a for a in allowed if a not in provided) or '(none)'}."
            )
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty
               and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
               and n not in kwargs and n not in provided]
    if missing:
        raise ConfigError(f"{kind} {name!r} is missing required argument(s) {missing}; add them under its kwargs.")


class NamedSpec(StrictModel):
    """``{name: ..., kwargs: {...}}``; a bare string is accepted as ``{name: <string>}``."""

    name: str
    kwargs: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v


class FileSource(StrictModel):
    """Your own data for a task's ``data`` section: ``files`` (a path, a glob, a list, or ``{train, validation,
    test}``) or ``hf_dataset`` (``{path, name, split}``), read by :func:`kdistill.data.files.load_rows`. A section
    that gives either and no ``name`` is ``name: files``."""

    files: str | list[str] | dict[str, str | list[str]] | None = None
    format: str = "auto"
    hf_dataset: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _own_data(cls, v: Any) -> Any:
        if isinstance(v, dict) and ("files" in v or "hf_dataset" in v) and "name" not in v:
            return {**v, "name": "files"}
        return v

    @model_validator(mode="after")
    def _one_source(self) -> FileSource:
        if getattr(self, "name", "files") == "files" and (self.files is None) == (self.hf_dataset is None):
            raise ValueError("data.name 'files' needs exactly one of data.files and data.hf_dataset")
        return self


#: The method each task distils with when a recipe names none, and the one that trains a student (or a teacher)
#: alone on its labels. Config is where defaults live: the tasks never spell a method's name.
DEFAULT_METHODS = {"classification": "hinton_kd", "tabular": "hinton_kd", "llm": "llm_kd",
                   "embedding": "embedding_kd", "graph": "glnn",
                   "diffusion": "consistency_distillation"}
#: the objective a diffusion teacher (and a student without a teacher) trains with
DENOISING = "denoising"
ALONE = "none"

#: the data selection each task uses when ``kdistill select`` runs on a recipe without ``data.selection``
DEFAULT_SELECTORS = {"llm": "miniplm", "classification": "pcoreset", "blackbox": "rad"}


class SelectionSpec(StrictModel):
    """``data.selection``: distil on a chosen part of the training pool (:mod:`kdistill.data.selection`).

    ``method``: a strategy from ``SELECTORS`` (``miniplm``, ``ddk``, ``pcoreset``, ``rad``, ``kd3``, ``random``);
    ``fraction`` of the pool kept, or ``budget`` examples (black-box recipes default to ``teacher.max_requests``);
    ``subset``: the ``--output`` folder of ``kdistill select``, reused as it is; ``domain_column`` (your own files)
    or ``groups`` (built-in corpora: ``division`` / ``testament`` / ``book`` for the KJV, ``pos`` for WordNet) give
    the domains DDK reweights. Any other key is a hyperparameter of the strategy (e.g. ``reference: smollm2-135m``,
    ``every: 50``), checked against it with close matches."""

    method: str = "random"
    fraction: float = 0.5
    budget: int | None = None
    subset: str | None = None
    domain_column: str | None = None
    groups: str | None = None
    options: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _flat_options(cls, v: Any) -> Any:
        if isinstance(v, str):
            return {"method": v}
        if not isinstance(v, dict):
            return v
        fields = set(cls.model_fields)
        extra = {k: x for k, x in v.items() if k not in fields}
        ref = extra.get("reference")
        if isinstance(ref, dict):  # reference: {name: X} or {pretrained: X}
            if len(ref) != 1 or next(iter(ref)) not in ("name", "pretrained"):
                raise ValueError(f"data.selection.reference: got {ref!r}, expected a zoo name or folder, or "
                                 "{name: ...} / {pretrained: ...}")
            extra["reference"] = next(iter(ref.values()))
        return {**{k: x for k, x in v.items() if k in fields}, "options": {**v.get("options", {}), **extra}}

    @model_validator(mode="after")
    def _check(self) -> SelectionSpec:
        from .data import selection

        selection.check_options(self.method, self.options)  # unknown method / option: close matches
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"data.selection.fraction: got {self.fraction}, expected a number in (0, 1] (the share "
                             "of the training pool kept)")
        if self.budget is not None:
            if self.budget < 1:
                raise ValueError(f"data.selection.budget: got {self.budget}, expected an integer >= 1")
            if "fraction" in self.model_fields_set:
                raise ValueError("data.selection: got both fraction and budget; expected one of them")
        return self

    def entry_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`kdistill.data.selection.select_training_subset` (without the pool)."""
        return {"method": self.method, "fraction": None if self.budget is not None else self.fraction,
                "budget": self.budget, "subset": self.subset, "options": dict(self.options)}


#: ``design.space`` when a recipe gives none: MLP and CNN students by width and depth (24 candidates)
DEFAULT_DESIGN_SPACE: dict[str, dict[str, list[Any]]] = {
    "mlp": {"width": [16, 32, 64, 128, 256], "depth": [1, 2, 3]},
    "cnn": {"width": [4, 8, 16], "depth": [2, 3, 4]},
}


class DesignSettings(StrictModel):
    """How ``kdistill design`` judges candidates, for every task: ``top_k`` candidates, best by the training-free
    score, are distilled briefly (0: all of them); ``steps``: optimizer steps of each brief distillation (the
    recipe's other ``train`` settings are kept); ``score_batches`` x ``score_batch_size`` training examples feed the
    training-free scores; ``law_fraction``: the student-to-teacher size ratio the Law of Capacity Gap's rule of thumb
    predicts to be best (the optimal teacher is about 2.5 times the student, so 0.4)."""

    top_k: int = 3
    steps: int = 300
    score_batches: int = 4
    score_batch_size: int = 64
    law_fraction: float = 0.4


class DesignSpec(DesignSettings):
    """``design:`` (``kdistill design``) of a classification recipe: the student search space
    (:mod:`kdistill.students.design`) and :class:`DesignSettings`.

    ``space``: ``{model family: {kwarg: [values]}}``, every combination one candidate (a single value is a fixed
    argument)."""

    space: dict[str, dict[str, Any]] = DEFAULT_DESIGN_SPACE

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, list[Any]]]:
        from . import models  # noqa: F401  (fills MODELS)
        from .registry import MODELS

        if not v:
            raise ValueError("design.space: got an empty search space; expected {family: {argument: [values]}}, "
                             "e.g. {mlp: {width: [32, 64], depth: [1, 2]}}")
        out: dict[str, dict[str, list[Any]]] = {}
        for family, args in v.items():
            MODELS.get(family)  # an unknown family: close matches
            if not isinstance(args, dict):
                raise ValueError(f"design.space.{family}: got {args!r}, expected a mapping of argument -> list of "
                                 "values, e.g. {width: [32, 64], depth: [1, 2]}")
            lists = {k: list(x) if isinstance(x, (list, tuple)) else [x] for k, x in args.items()}
            for k, x in lists.items():
                if not x:
                    raise ValueError(f"design.space.{family}.{k}: got an empty list; expected at least one value")
            check_kwargs("model", family, MODELS.get(family), {k: x[0] for k, x in lists.items()},
                         provided=("input_shape", "num_classes"))
            out[family] = lists
        return out

    @model_validator(mode="after")
    def _numbers(self) -> DesignSpec:
        for name, low in (("top_k", 0), ("steps", 1), ("score_batches", 1), ("score_batch_size", 2)):
            if getattr(self, name) < low:
                raise ValueError(f"design.{name}: got {getattr(self, name)}, expected an integer >= {low}")
        if not 0.0 < self.law_fraction < 1.0:
            raise ValueError(f"design.law_fraction: got {self.law_fraction}, expected a number in (0, 1)")
        return self


class MethodSpec(NamedSpec):
    """A distillation method from ``METHODS``; kwargs go to its constructor."""

    name: str = DEFAULT_METHODS["classification"]

    @model_validator(mode="after")
    def _validate(self) -> MethodSpec:
        cls = METHODS.get(self.name)
        check_kwargs("method", self.name, cls.__init__, self.kwargs)
        try:
            cls(**self.kwargs)  # cheap: methods build shape-dependent parts in setup()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"method {self.name!r} rejected its kwargs {self.kwargs}: {e}") from None
        return self

    @property
    def method_class(self) -> Any:
        """The registered class, for reading what the method declares (``needs_teacher``, ``cacheable``, ...) without
        building it: the tasks look methods up only through this and :meth:`build`."""
        return METHODS.get(self.name)

    def build(self) -> Any:
        """A fresh instance of the method with these kwargs: the tasks build methods only through this, so they
        never read a method's kwargs themselves."""
        return self.method_class(**self.kwargs)


class AugmentSpec(NamedSpec):
    """A loop-level input augmentation from ``AUGMENTS`` (e.g. ``mixup``)."""

    @model_validator(mode="after")
    def _validate(self) -> AugmentSpec:
        check_kwargs("augmentation", self.name, AUGMENTS.get(self.name), self.kwargs, provided=("num_classes",))
        return self


class TrainSpec(StrictModel):
    """Optimisation settings, turned into keyword arguments of :func:`kdistill.train.loop.fit`."""

    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 128
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_steps: int = 0
    step_size: int = 30
    gamma: float = 0.1
    grad_accum: int = 1
    max_grad_norm: float | None = None
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    eval_every: int = 0
    log_every: int = 50
    checkpoint_every: int = 0
    tensorboard: bool = False

    @field_validator("epochs", "batch_size", "grad_accum")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1 (got {v})")
        return v

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"must be > 0 (got {v})")
        return v


# ---------------------------------------------------------------------------------------------- loading


def _format_validation_error(err: ValidationError, model: type[BaseModel], source: str) -> ConfigError:
    lines = [f"invalid recipe {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = e.get("input")
        if e["type"] == "extra_forbidden":
            fields = _fields_at(model, e["loc"][:-1])
            m = close_matches(str(e["loc"][-1]), fields)
            hint = f" Did you mean {' or '.join(repr(x) for x in m)}?" if m else ""
            lines.append(f"- {loc}: unknown field.{hint} Allowed here: {', '.join(fields)}.")
        elif e["type"] == "missing":
            lines.append(f"- {loc}: required field is missing.")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            shown = _redact(str(e["loc"][-1]) if e["loc"] else "", got)
            lines.append(f"- {loc}: {msg} (got {shown}).")
    return ConfigError("\n".join(lines))


_SECRET_WORDS = ("key", "token", "secret", "password")


def _redact(field: str, value: Any) -> str:
    """Never echo what may be a credential: values of key/token/secret fields are shown as their length."""
    if any(w in field.lower() for w in _SECRET_WORDS) and isinstance(value, str) and value:
        return f"<redacted, {len(value)} characters>"
    return repr(value)


def _fields_at(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    cur: Any = model
    for part in loc:
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return []
        field = cur.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        cur = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else (args[0] if args else None)
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return sorted(cur.model_fields)
    return []


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.epochs=5 or method=dkd.")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key; expected key=value, e.g. train.epochs=5.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string; users mean a number
        try:
            value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf") else value
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        cur = data
        for part in path[:-1]:
            nxt = cur.get(part)
            if isinstance(nxt, str):  # "method: dkd" shorthand -> {"name": "dkd"}
                nxt = {"name": nxt}
            if nxt is None:
                nxt = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {part!r} holds {nxt!r}, not a section; "
                                  "cannot set a key inside it.")
            cur[part] = nxt
            cur = nxt
        cur[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist; expected a YAML file. "
                          "Run `kdistill list` for the built-in recipes.")
    try:
        data = yaml.safe_load(p.read_text())  # safe_load: no YAML tag runs code
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r}: expected a mapping at the top level, got {type(data).__name__}.")
    return data


def validate(data: Mapping[str, Any], source: str = "<dict>") -> BaseModel:
    """Validate a recipe mapping against its task's schema (``task:`` key, default ``classification``)."""
    from . import tasks  # noqa: F401  (fills TASKS)

    data = dict(data)
    task_name = data.get("task", "classification")
    task = TASKS.get(task_name)
    try:
        return task.config_model.model_validate(data)
    except ValidationError as e:
        raise _format_validation_error(e, task.config_model, source) from None


def load_config(recipe: str | Path | Mapping[str, Any] | None = None, overrides: Sequence[str] = ()) -> BaseModel:
    """Read and validate a recipe (path, built-in name such as ``classic/mnist1d`` or a dict)."""
    from .recipes import DEFAULT_RECIPE, find_recipe

    if recipe is None:
        recipe = DEFAULT_RECIPE
    if isinstance(recipe, Mapping):
        data, source = dict(recipe), "<dict>"
    else:
        path = find_recipe(recipe)
        data, source = read_yaml(path), str(path)
    data = apply_overrides(data, overrides)
    return validate(data, source)
