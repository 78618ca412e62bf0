"""``llm_kd``: token-level distillation of a causal language model, any divergence by name.

Per position ``i`` of a sequence (the prediction of token ``i + 1``), with ``mask`` the positions that count::

    L = alpha * T^k * mean_i D(p_teacher(. | x_<=i) , p_student(. | x_<=i); T)  +  (1 - alpha) * CE(student, labels)

``D`` is chosen with ``loss``:

=====================  ============================================================================
``forward_kl``         KL(p_t || p_s): classic word-level KD (Hinton et al., 2015; Kim & Rush, 2016)
``reverse_kl``         KL(p_s || p_t): mode-seeking (MiniLLM, Gu et al., 2024)
``generalized_jsd``    JSD(beta) of GKD (Agarwal et al., 2024); ``loss_kwargs: {beta: 0.5}``
``skew_kl``            KL(p_t || a p_t + (1-a) p_s) (DistiLLM, Ko et al., 2024); ``{skew: 0.1}``
``skew_reverse_kl``    KL(p_s || a p_s + (1-a) p_t) (DistiLLM); ``{skew: 0.1}``
``tvd``                total variation distance
``taid``               KL(p_interp(t) || p_s), ``t`` from the adaptive schedule of TAID (Shing et al.,
                       2025); ``{t_start: 0.4, t_end: 1.0, alpha: 5e-4, beta: 0.99, total_steps: N}``
``token_selective``    only tokens where the teacher is more confident, + entropy term (TSD-KD, 2025);
                       ``{entropy_weight: 0.1}``
``uld``                Universal Logit Distillation (Boizard et al., 2024): cross-tokenizer, sorted probs
=====================  ============================================================================

Teacher targets come either from teacher logits ``(B, T, V)`` or, offline, from a top-k cache
(``teacher.extra`` holds ``topk_logprobs`` / ``topk_indices`` / ``log_residual``, see
:mod:`kdistill.teachers.cache`); then the divergence runs on the coarsened (k + 1)-category distributions
of :mod:`kdistill.losses.topk` and the teacher is never loaded (``cacheable = True``; ``uld`` has no
top-k form). A sampled cache (``cache.mode: sampled``) holds ``sample_indices`` / ``sample_weights`` /
``teacher_entropy`` instead, for :func:`~kdistill.losses.topk.sampled_loss`: unbiased, so ``forward_kl`` only
(:meth:`check_cache_mode` refuses the rest). ``chunk_size > 0`` evaluates the loss over row chunks
(:func:`kdistill.losses.chunked.chunked`), same values and gradients with a fraction of the memory for large
vocabularies.

``fused = True`` goes one step further: the student forward hands over its final hidden states and LM head
(``student.extra``: ``hidden``, ``lm_head_weight``, optional ``lm_head_bias``, and the ``softcap`` /
``logit_scale`` of its config; the ``llm`` task's forward does this, :func:`kdistill.teachers.lm.fused_head_output`)
and :func:`~kdistill.losses.chunked.fused_linear_loss` builds the student logits chunk by chunk, so they never
exist in full. A live teacher hands over its hidden states and head the same way (``teacher.extra``), so neither
model's ``(tokens, V)`` logits exist; teacher logits and top-k cache targets work too. With ``alpha < 1`` the CE
term against the labels is computed in the same chunks. ``chunk_size = 0`` then picks the chunk from the sizes
(:func:`~kdistill.losses.chunked.fused_chunk_size`). Values and gradients equal the unfused loss.

``T^k`` keeps the gradient scale independent of ``kd_temperature``; ``k`` depends on the divergence
(:data:`kdistill.losses.logits.TEMPERATURE_POWER`): ``k = 2`` for the KL family (forward/reverse KL, JSD, skew,
TAID, token-selective: their gradients shrink like ``1/T^2``), ``k = 1`` for ``tvd`` and ``uld`` (L1-type: ``1/T``);
a ``T^2`` on those would grow their gradients ``T``-fold (x8 at T = 8).
With ``loss: uld`` it also serves a student with its own tokenizer (``cross_tokenizer``): the llm task then feeds
the teacher its own tokens of the same text (:mod:`kdistill.data.align`) and the i-th student position is paired
with the i-th teacher position, as ULD pairs the answer tokens in order, up to the shorter of the two (on chat and
prompt rows, the i-th reply position: the batch's ``teacher_offset`` shifts the teacher past its own context).
When to use: the student shares the teacher's tokenizer (``uld`` otherwise); ``forward_kl`` is the safe
default, ``skew_*`` / ``taid`` help when the student is much smaller than the teacher.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import KDistillError, expect, unknown_name
from ..losses import logits as L
from ..losses.chunked import apply_head_transform, chunked, fused_linear_loss
from ..losses.reduce import kd_scale, masked_mean
from ..losses.topk import DIVERGENCES, SAMPLED_DIVERGENCES, sampled_loss, topk_loss
from ..registry import METHODS
from .base import Method, ModelOutput, label_loss, require_teacher

LOSSES = {
    "forward_kl": L.forward_kl, "reverse_kl": L.reverse_kl, "generalized_jsd": L.generalized_jsd,
    "skew_kl": L.skew_kl, "skew_reverse_kl": L.skew_reverse_kl, "tvd": L.tvd, "taid": L.taid,
    "token_selective": L.token_selective, "uld": L.uld,
}
_TAID_SCHEDULE_KEYS = ("t_start", "t_end", "alpha", "beta", "total_steps", "adaptive")


def _check_loss_kwargs(loss: str, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``loss_kwargs`` into (loss keywords, TAID schedule keywords) and validate the names."""
    fn = LOSSES[loss]
    allowed = [n for n, p in inspect.signature(fn).parameters.items()
               if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in ("kd_temperature", "t")]
    if loss == "taid":
        allowed += list(_TAID_SCHEDULE_KEYS)
    for key in kwargs:
        if key == "kd_temperature":
            raise KDistillError("llm_kd loss_kwargs: kd_temperature is a method argument; set it once as "
                                "`kd_temperature:` (it applies to every loss).")
        if key not in allowed:
            raise unknown_name(f"argument of loss {loss!r}", key, allowed or ["(none)"])
    if loss != "taid":
        return kwargs, {}
    sched = {k: v for k, v in kwargs.items() if k in _TAID_SCHEDULE_KEYS}
    return {k: v for k, v in kwargs.items() if k not in _TAID_SCHEDULE_KEYS}, sched


def _mean_over_ranks(value: Tensor) -> float:
    """The mean of a scalar over all processes (one all-reduce), or the value itself outside a process group.

    TAID's schedule adapts ``t`` to the loss. Each rank sees only its own micro-batch, so with local losses
    the ranks' ``t`` would drift apart; averaging first gives every rank the same update and the same ``t``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        v = value.detach().float().reshape(1).clone()
        dist.all_reduce(v)
        return float(v) / dist.get_world_size()
    return float(value)


@METHODS.register("llm_kd")
class LLMKD(Method):
    """Token-level LM distillation with a divergence chosen by name (see the module docstring)."""

    cacheable = True

    def __init__(self, loss: str = "forward_kl", kd_temperature: float = 1.0, alpha: float = 1.0,
                 loss_kwargs: dict[str, Any] | None = None, chunk_size: int = 0, fused: bool = False) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise unknown_name("llm_kd loss", loss, LOSSES)
        expect(kd_temperature > 0, "llm_kd kd_temperature", kd_temperature, "a positive number")
        expect(0.0 <= alpha <= 1.0, "llm_kd alpha", alpha, "a number in [0, 1] (weight of the distillation term)")
        expect(isinstance(chunk_size, int) and chunk_size >= 0, "llm_kd chunk_size", chunk_size,
               "an integer >= 0 (0 = no chunking; with fused: chosen from the sizes)")
        self.fused = bool(fused)
        self.loss_name, self.kd_temperature, self.alpha, self.chunk_size = (loss, float(kd_temperature), float(alpha),
                                                                            chunk_size)
        self.loss_kwargs, sched_kwargs = _check_loss_kwargs(loss, dict(loss_kwargs or {}))
        self.schedule: L.TAIDSchedule | None = None
        if loss == "taid":
            total = sched_kwargs.pop("total_steps", None)
            self._taid_kwargs = sched_kwargs
            self.schedule = L.TAIDSchedule(int(total) if total else 1, **sched_kwargs)
            self._taid_total_set = bool(total)
            # t, step, momentum, previous loss (NaN = none): a buffer, so checkpoints and resume keep it
            self.register_buffer("taid_state", torch.tensor([self.schedule.t, 0.0, 0.0, math.nan], dtype=torch.float64))
        # validate the loss keywords once on a tiny input: bad values fail at config time
        probe = torch.zeros(1, 3)
        extra = {"t": 0.5} if loss == "taid" else {}
        LOSSES[loss](probe, probe, kd_temperature=self.kd_temperature, **self.loss_kwargs, **extra)

    @property
    def fused_head(self) -> bool:
        return self.fused

    @property
    def cross_tokenizer(self) -> bool:
        """``uld`` compares sorted distributions, so it needs no shared vocabulary: in a cross-tokenizer batch the
        student's and the teacher's positions are paired in order (ULD's pairing), up to the shorter sequence."""
        return self.loss_name == "uld"

    def cache_identity(self) -> dict[str, Any]:
        """Top-k targets are stored at the loss temperature: a cache must have been written at this one."""
        return {"kd_temperature": self.kd_temperature}

    @property
    def teacher_divergence_term(self) -> str:
        """``kd``: the divergence to the teacher on the training batches (a stand-in teacher-hacking proxy)."""
        return "kd"

    def set_total_steps(self, total_steps: int) -> None:
        """Called by the task runner with the run's number of optimizer steps (TAID's linear floor)."""
        if self.schedule is not None and not self._taid_total_set:
            self.schedule.total_steps = max(1, int(total_steps))

    # ---------------------------------------------------------------------------------- TAID state
    def _taid_t(self) -> float:
        s, st = self.schedule, self.taid_state
        s.t, s.step, s.momentum = float(st[0]), int(st[1]), float(st[2])
        s.prev_loss = None if math.isnan(float(st[3])) else float(st[3])
        return s.t

    def _taid_update(self, value: float) -> None:
        s = self.schedule
        s.update(value)
        self.taid_state.copy_(torch.tensor([s.t, float(s.step), s.momentum,
                                            math.nan if s.prev_loss is None else s.prev_loss], dtype=torch.float64))

    # ----------------------------------------------------------------------------------------- forward
    def per_token(self, student_logits: Tensor, teacher: ModelOutput) -> Tensor:
        kw = dict(self.loss_kwargs)
        if self.schedule is not None:
            kw["t"] = self._taid_t()
        teacher_logits = teacher.logits
        if teacher_logits is None and "lm_head_weight" in teacher.extra:  # a fused teacher output, unfused student
            ex = teacher.extra
            teacher_logits = apply_head_transform(F.linear(ex["hidden"], ex["lm_head_weight"], ex.get("lm_head_bias")),
                                                  softcap=ex.get("softcap"), logit_scale=ex.get("logit_scale"))
        if teacher_logits is not None:
            fn = LOSSES[self.loss_name]
            if self.chunk_size:
                fn = chunked(fn, self.chunk_size)
            return fn(student_logits, teacher_logits, kd_temperature=self.kd_temperature, **kw)
        loss_fn, args = self._topk_targets(teacher)
        fn = chunked(loss_fn, self.chunk_size) if self.chunk_size else loss_fn
        return fn(student_logits, *args, divergence=self.loss_name, kd_temperature=self.kd_temperature, **kw)

    def check_cache_mode(self, mode: str) -> None:
        """Sampled targets estimate only losses linear in the teacher distribution without bias: refuse the others."""
        if mode == "sampled" and self.loss_name not in SAMPLED_DIVERGENCES:
            raise KDistillError(f"llm_kd loss {self.loss_name!r} with cache.mode 'sampled': a sampled target is an "
                                f"unbiased estimate only for {list(SAMPLED_DIVERGENCES)} (linear in the teacher's "
                                "distribution). Fix: loss: forward_kl, or cache.mode: topk.")

    def _topk_targets(self, teacher: ModelOutput) -> tuple[Any, list[Tensor]]:
        """The loss and the cached targets of a teacher output, checked: top-k (log-probs, indices, optional log
        residual) for :func:`~kdistill.losses.topk.topk_loss`, or sampled (indices, weights, optional teacher
        entropy) for :func:`~kdistill.losses.topk.sampled_loss`."""
        ex = teacher.extra
        sampled = "sample_indices" in ex
        if not sampled and ("topk_logprobs" not in ex or "topk_indices" not in ex):
            raise KDistillError("llm_kd: the teacher output has neither logits nor cached top-k targets "
                                "(extra['topk_logprobs'], extra['topk_indices']). Give a teacher or a cache.")
        if self.loss_name not in DIVERGENCES:
            raise KDistillError(f"llm_kd loss {self.loss_name!r} cannot run on a top-k cache; expected one of "
                                f"{sorted(DIVERGENCES)}. Fix: train with the teacher model instead of `cache:`.")
        if sampled:
            self.check_cache_mode("sampled")
        cache_t = ex.get("kd_temperature")
        if cache_t is not None and not math.isclose(float(cache_t), self.kd_temperature, rel_tol=1e-9):
            raise KDistillError(f"llm_kd: the cache was written at kd_temperature={cache_t}, the method uses "
                                f"{self.kd_temperature}. Fix: set the same kd_temperature or re-run `kdistill cache`.")
        keys = ("sample_indices", "sample_weights", "teacher_entropy") if sampled else (
            "topk_logprobs", "topk_indices", "log_residual")
        args = [ex.get(key) for key in keys]
        return (sampled_loss if sampled else topk_loss), (args if args[-1] is not None else args[:-1])

    def fused_per_token(self, student: ModelOutput, teacher: ModelOutput, kd_mask: Tensor | None,
                        ce_mask: Tensor | None, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Per-token divergence, and per-token CE against ``labels`` (None: no CE term), from the student's hidden
        states and LM head: :func:`~kdistill.losses.chunked.fused_linear_loss` against the teacher's hidden states
        and head, its logits, or cached top-k targets. The gradient hint is the per-row weight of each term in
        :meth:`forward` (weight x mask / count), so the gradient is formed during the forward pass."""
        ex = student.extra
        if "hidden" not in ex or "lm_head_weight" not in ex:
            raise KDistillError("llm_kd fused=True: the student output has no extra['hidden'] / "
                                "extra['lm_head_weight']; expected the llm task's fused student forward "
                                "(or set fused: false).")
        kw = dict(self.loss_kwargs)
        if self.schedule is not None:
            kw["t"] = self._taid_t()
        hidden = ex["hidden"]
        lead = hidden.shape[:-1]

        def weights(mask: Tensor | None, factor: float) -> Tensor:
            m = torch.ones(lead, dtype=torch.bool, device=hidden.device) if mask is None else mask.expand(lead)
            return m.float() * (factor / max(int(m.sum()), 1))

        scale = self.alpha * kd_scale(self.kd_temperature, power=L.TEMPERATURE_POWER[self.loss_name])
        hint: Any = weights(kd_mask, scale)
        if labels is not None:
            hint = (hint, weights(ce_mask, 1.0 - self.alpha))
        common = dict(bias=ex.get("lm_head_bias"), chunk_size=self.chunk_size or None, softcap=ex.get("softcap"),
                      logit_scale=ex.get("logit_scale"), labels=labels, grad_hint=hint,
                      kd_temperature=self.kd_temperature, **kw)
        tex = teacher.extra
        if teacher.logits is not None:
            out = fused_linear_loss(LOSSES[self.loss_name], hidden, ex["lm_head_weight"], teacher.logits, **common)
        elif "hidden" in tex and "lm_head_weight" in tex:
            out = fused_linear_loss(LOSSES[self.loss_name], hidden, ex["lm_head_weight"], teacher_hidden=tex["hidden"],
                                    teacher_weight=tex["lm_head_weight"], teacher_bias=tex.get("lm_head_bias"),
                                    teacher_softcap=tex.get("softcap"), teacher_logit_scale=tex.get("logit_scale"),
                                    **common)
        else:
            loss_fn, args = self._topk_targets(teacher)
            out = fused_linear_loss(loss_fn, hidden, ex["lm_head_weight"], *args,
                                    divergence=self.loss_name, **common)
        return out if labels is not None else (out, None)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher = require_teacher("llm_kd", teacher)
        mask = batch.get("mask")
        if mask is not None and "teacher_mask" in batch:  # cross-tokenizer batch: pairs up to the shorter sequence
            t_mask = batch["teacher_mask"]
            if "teacher_offset" in batch:  # chat / prompt rows: each side's reply starts after its own context
                teacher, t_mask = _shift_teacher(teacher, t_mask, batch["teacher_offset"])
            mask = mask & t_mask
        ce_per_token = None
        if self.fused and student.logits is None:  # hidden states + LM head (the task's training forward)
            per_token, ce_per_token = self.fused_per_token(student, teacher, mask, batch.get("mask"),
                                                           batch["labels"] if self.alpha < 1.0 else None)
        else:
            per_token = self.per_token(student.logits, teacher)
        kd = masked_mean(per_token, mask)
        out = {"kd": self.alpha * kd_scale(self.kd_temperature, power=L.TEMPERATURE_POWER[self.loss_name]) * kd}
        if self.alpha < 1.0:
            out["ce"] = (1.0 - self.alpha) * (masked_mean(ce_per_token, batch.get("mask")) if ce_per_token is not None
                                              else label_loss(student.logits, batch))
        if self.schedule is not None:
            self.log("taid_t", self.schedule.t)
            if self.training and torch.is_grad_enabled():
                self._taid_update(_mean_over_ranks(kd.detach()))
        return out


def _shift_teacher(teacher: ModelOutput, teacher_mask: Tensor, offset: Tensor) -> tuple[ModelOutput, Tensor]:
    """The teacher's per-position outputs (logits, or the fused head's hidden states) and mask moved by ``offset``
    positions per row, so that the i-th reply position of the student meets the teacher's i-th
    (:func:`kdistill.data.align.shift_positions`)."""
    from ..data.align import shift_positions

    mask, valid = shift_positions(teacher_mask, offset)
    extra = dict(teacher.extra)
    logits = teacher.logits
    if logits is not None:
        logits = shift_positions(logits, offset)[0]
    elif "hidden" in extra:
        extra["hidden"] = shift_positions(extra["hidden"], offset)[0]
    else:
        raise KDistillError("llm_kd: a cross-tokenizer row batch needs the teacher's logits or hidden states to pair "
                            "reply positions; got neither (a top-k cache cannot serve a student with its own "
                            "tokenizer).")
    return ModelOutput(logits, features=teacher.features, extra=extra), mask & valid

