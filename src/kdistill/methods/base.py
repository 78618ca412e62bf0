"""The method contract.

A method is a small ``nn.Module`` that holds only its own extra parameters (projectors, memory banks).
It never stores the student or the teacher. The loop calls::

    losses = method(student_out, teacher_out, batch)   # {term: already-weighted scalar}
    total = sum(losses.values())

``student_out`` / ``teacher_out`` are :class:`ModelOutput` objects; ``teacher_out`` is ``None`` for
methods that do not need a teacher. Each term must be a *mean over the micro-batch* (use
``masked_mean`` with ``batch.get("mask")``); the loop rescales it so that gradient accumulation and
multi-process runs give the same update as one big batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from ..losses.logits import cross_entropy, soft_cross_entropy
from ..losses.reduce import masked_mean


@dataclass
class ModelOutput:
    """What a forward pass produced: ``logits`` (``(B, C)`` or ``(B, T, V)``), hooked ``features``
    by layer name, and task-specific ``extra`` entries (e.g. cached top-k targets)."""

    logits: Tensor | None
    features: dict[str, Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SetupInfo:
    """What a method may need to size its parameters before training, gathered from one probe batch."""

    student_features: dict[str, tuple[int, ...]]
    teacher_features: dict[str, tuple[int, ...]]
    num_classes: int | None = None
    num_train: int | None = None
    student_logits: tuple[int, ...] | None = None
    teacher_logits: tuple[int, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Optional per-dataset statistics (filled by the runner when it has them; methods fall back to
    # estimating them online). ``teacher_class_means[layer]``: (C, D) mean of the teacher's flattened
    # features of ``layer`` per training class (used by ``nd_loss``).
    teacher_class_means: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class DiffusionStage:
    """One stage of a diffusion distillation run: its ``name`` (a folder name) and whose outputs are its teacher:
    ``"teacher"`` (the run's teacher, guided) or ``"previous"`` (a frozen copy of the student at the end of the stage
    before; progressive distillation)."""

    name: str
    teacher: str = "teacher"


class Method(nn.Module):
    """Base class. Subclasses set ``student_layers`` / ``teacher_layers`` (layer names to hook), and the class
    flags ``cacheable`` (teacher targets can be precomputed offline), ``needs_teacher`` and ``needs_prompts``.

    What a method needs from the run it declares through the hooks below (no-op defaults), so that a task never
    tests a method's name or reads its keyword arguments:

    * ``needs_prompts``: batches of (prompt, continuation) (on-policy methods generate continuations);
    * :meth:`prepare_batch`: rewrite a batch before the forward pass, e.g. generate from the student;
    * :meth:`set_total_steps`: the run's number of optimizer steps (schedules);
    * :meth:`resolve_layers`: layer names that depend on the models (called by the loop, before capture);
    * :meth:`cache_identity`: what offline teacher targets must have been written with (e.g. its temperature);
      :meth:`check_cache_mode`: whether it can train from a cache's kind of targets (top-k or sampled);
    * ``uses_token_states`` / ``needs_pairs`` / ``fused_head``: the forward outputs and data layout it reads;
    * ``cross_tokenizer`` / :meth:`set_vocab_map`: it compares a student and a teacher with different tokenizers
      (the batch then carries the teacher's own tokens and the alignment of :mod:`kdistill.data.align`);
    * ``teacher_divergence_term``: which logged loss term is a divergence to the teacher (audits);
    * ``distills_data`` / :meth:`distill_data`: it builds a small training set (dataset distillation) instead of
      only training a student; its forward is then the loss of a student trained on that set;
    * ``trains_on_unlabelled`` / :meth:`fit_graph`: graph distillation (task ``graph``): the student also trains on
      nodes without a label (``labels == -100``), and the method learns what it needs from the frozen teacher on the
      training graph before the student trains (e.g. a codebook of node tokens);
    * ``diffusion_sampler`` / :meth:`prepare_diffusion` / :meth:`diffusion_stages` / :meth:`set_diffusion_stage` /
      :meth:`after_optimizer_step`: diffusion step distillation (task ``diffusion``): how the student samples, what
      it copies or learns before training (an EMA target network, a fake-score network), the stages of the run (e.g.
      halving the steps, the previous stage's student as the next teacher), and per-step updates of its own state.
    """

    cacheable: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = True
    needs_prompts: ClassVar[bool] = False
    distills_data: ClassVar[bool] = False
    trains_on_unlabelled: ClassVar[bool] = False
    #: how a diffusion student samples (a name in :data:`kdistill.models.diffusion.SAMPLERS`)
    diffusion_sampler: ClassVar[str] = "ddim"

    def __init__(self) -> None:
        super().__init__()
        self.student_layers: tuple[str, ...] = ()
        self.teacher_layers: tuple[str, ...] = ()
        self._metrics: dict[str, float] = {}

    def setup(self, info: SetupInfo) -> None:
        """Create shape-dependent parameters. Called once, before the optimizer is built."""

    def set_total_steps(self, total_steps: int) -> None:
        """The run's number of optimizer steps, before training (schedules that span the run use it)."""

    def resolve_layers(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Fill ``student_layers`` / ``teacher_layers`` from the models' structure (e.g. "the last attention
        layer's q/k/v projections"). Called once by the loop, before any forward, with the unwrapped models
        (``teacher`` is None when its targets come from a cache)."""

    def prepare_batch(self, student: nn.Module, batch: dict[str, Any], *, pad_id: int | None = None,
                      eos_id: int | None = None) -> dict[str, Any]:
        """The batch the step trains on, given the current student (on-policy methods generate here)."""
        return batch

    def cache_identity(self) -> dict[str, Any]:
        """What precomputed teacher targets must match to serve this method (e.g. ``{"kd_temperature": 2.0}``)."""
        return {}

    def check_cache_mode(self, mode: str) -> None:
        """Raise a :class:`~kdistill.errors.KDistillError` (with the fix) when this method, as configured, cannot
        train from cached targets of ``mode`` (``topk`` / ``sampled``, :data:`kdistill.teachers.cache.MODES`); checked
        at config load and before a cache is written."""

    @property
    def uses_token_states(self) -> bool:
        """True when the forward reads per-token hidden states (``features["tokens"]``) of both models."""
        return False

    @property
    def needs_pairs(self) -> bool:
        """True when a batch must hold (query, candidate) pairs in consecutive rows."""
        return False

    @property
    def fused_head(self) -> bool:
        """True when the student forward (and a live teacher's, where it has a linear LM head) hands over hidden states
        and the LM head instead of logits."""
        return False

    @property
    def cross_tokenizer(self) -> bool:
        """True when the method handles a student whose tokenizer differs from the teacher's: its batches then hold
        the teacher's tokens of the same text (``teacher_input_ids``, ``teacher_attention_mask``, ``teacher_mask``)
        and the character alignment of :func:`kdistill.data.align.cross_blocks`."""
        return False

    @property
    def teacher_divergence_term(self) -> str | None:
        """The key of the forward's loss term that is a divergence to the teacher on the training batches (``"kd"``),
        or None. ``kdistill audit`` falls back to that logged term as the teacher-hacking proxy of a run that logged
        none (:mod:`kdistill.eval.audit`)."""
        return None

    def set_vocab_map(self, student_ids: Tensor, teacher_ids: Tensor) -> None:
        """Cross-tokenizer runs: the token pairs that are the same string in both vocabularies (``(M,)`` each, see
        :func:`kdistill.data.align.vocab_map`), given once before training."""

    def distill_data(self, *, inputs: Tensor, labels: Tensor, num_classes: int, per_class: int,
                     teacher: nn.Module | None, build_model: Callable[[], nn.Module], seed: int,
                     cache_dir: Path | None = None, cache_key: dict[str, Any] | None = None,
                     progress: bool = False) -> Any:
        """Dataset distillation (methods with ``distills_data``): a :class:`kdistill.data.distilled.DistilledSet`
        of about ``per_class`` examples of every class that stands in for the training data ``(inputs, labels)``.
        ``teacher``: a trained classifier (frozen) for methods that read one; ``build_model()``: a fresh network of
        the run's distillation architecture (the one synthetic data is matched on); ``cache_dir`` / ``cache_key``:
        where and under which identity of the data and that architecture expensive intermediate results (e.g.
        expert trajectories) may be cached. Methods that only train a student return None."""
        return None

    def fit_graph(self, *, teacher_features: dict[str, Tensor], node_features: Tensor, edge_index: Tensor,
                  seed: int) -> dict[str, Any]:
        """Graph distillation, before the student trains: learn from the frozen teacher on the training graph.
        ``teacher_features``: the teacher's ``teacher_layers`` outputs of the student's training nodes ``(N, D)``;
        ``node_features`` ``(N, F)``: their inputs; ``edge_index`` ``(2, E)``: the edges among them (row ids).
        Returns diagnostics for the report. Default: nothing to learn."""
        return {}

    def prepare_diffusion(self, *, student: nn.Module, teacher: nn.Module, schedule: Any, guidance_scale: float,
                          null_class: int, sample_shape: tuple[int, ...], num_classes: int,
                          seed: int) -> dict[str, Any]:
        """Diffusion step distillation, before the student trains: keep the ``schedule``
        (:class:`kdistill.models.diffusion.DiffusionSchedule`) and copy or learn what the method needs -- never the
        student or the teacher themselves, but e.g. an EMA copy of the student as a target network, or a copy of the
        teacher as a trainable fake-score network. ``teacher`` is the raw denoiser ``(z, t, y) -> v``; the run samples
        it with classifier-free guidance of ``guidance_scale`` (``null_class``: the label id of "no class").
        ``sample_shape``: one example's shape. Returns diagnostics for the report. Default: nothing."""
        return {}

    def diffusion_stages(self) -> list[DiffusionStage]:
        """The stages of a diffusion distillation run, trained one after another on equal shares of the step budget
        (progressive distillation: one stage per halving). Default: one stage against the teacher."""
        return [DiffusionStage("distil")]

    def set_diffusion_stage(self, index: int) -> None:
        """Called before stage ``index`` of :meth:`diffusion_stages` trains (and again when a run resumes in it)."""

    def after_optimizer_step(self, student: nn.Module) -> None:
        """Called after every optimizer step with the (unwrapped) student, e.g. to update an EMA target network held
        as the method's own state (saved in its checkpoints)."""

    def log(self, name: str, value: Tensor | float) -> None:
        """Record a diagnostic (not a loss term); the loop collects it with :meth:`pop_metrics`."""
        self._metrics[name] = float(value.detach()) if isinstance(value, Tensor) else float(value)

    def pop_metrics(self) -> dict[str, float]:
        out, self._metrics = self._metrics, {}
        return out

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        raise NotImplementedError


def label_loss(logits: Tensor, batch: dict[str, Any]) -> Tensor:
    """Mean supervised loss of a batch: soft cross-entropy against ``batch['target_probs']`` when an
    augmentation provided mixed targets, else cross-entropy on ``batch['labels']``."""
    mask = batch.get("mask")
    if batch.get("target_probs") is not None:
        return masked_mean(soft_cross_entropy(logits, batch["target_probs"]), mask)
    return masked_mean(cross_entropy(logits, batch["labels"]), mask)


def require_teacher(name: str, teacher: ModelOutput | None) -> ModelOutput:
    if teacher is None:
        raise RuntimeError(f"method {name!r} needs teacher outputs, but the loop passed none")
    return teacher
