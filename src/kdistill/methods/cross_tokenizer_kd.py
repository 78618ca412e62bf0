"""``cross_tokenizer_kd``: distil a teacher whose tokenizer differs from the student's, tokens aligned by characters.

Each training text is tokenised by both tokenizers; :func:`kdistill.data.align.cross_blocks` cuts both token
sequences into *groups* covering the same characters (cut wherever both tokenisations end a token). For the
position pair ``(i, j)`` that predicts a group's first token (same text read by both models), with ``T`` the
``kd_temperature``::

    L = matched_weight * T^2 * mean_{exact groups}  KL_shared(p_t(. | i) || p_s(. | j))
      + merged_weight  * T^2 * mean_{other groups}  KL(Ber(P_t(span)) || Ber(P_s(span)))
      + uld_weight     * T   * mean_{other groups}  ULD(p_s(. | j), p_t(. | i))
      + ce_weight * CE(student, next student token)

* *exact group* (one student token and one teacher token covering the same span): ``KL_shared``
  (:func:`kdistill.losses.cross_tokenizer.shared_vocab_kl`) compares the two next-token distributions on the tokens
  whose strings exist in both vocabularies (:func:`kdistill.data.align.vocab_map`, computed once), plus one bucket
  for all other tokens of each vocabulary;
* *other groups* (the tokenisations differ over the span, e.g. one student token for three teacher tokens): the
  span's probability under each model is the chain of its own tokens' probabilities,
  ``P(span) = prod_k p(x_k | x_<k)`` (:func:`~kdistill.losses.cross_tokenizer.span_kl` compares the two as yes/no
  events; its gradient reaches every student position of the span), and ULD (the sorted-probability
  Wasserstein-1 distance, :func:`kdistill.losses.logits.uld`) compares the full distributions at the span's first
  position, where no token-level correspondence exists.

With the same tokenizer on both sides (no alignment in the batch) every position is an exact group over the whole
vocabulary: the method is then forward KL at every position.

Papers: "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs" (Boizard et al.,
2024) for ULD; GOLD, General Online Logit Distillation (Hugging Face, 2025, "Unlocking On-Policy Distillation for
Any Model Family"), for a KL on the tokens both vocabularies share plus ULD on the rest, after aligning the two
token sequences by their text; "Universal Cross-Tokenizer Distillation via Approximate Likelihood Matching"
(Minixhofer, Vulic & Ponti, 2025) for comparing the likelihoods of aligned chunks as binary events. Written from
these descriptions: the exact definitions above (groups cut at shared character boundaries, the rest bucket, the
chain probability over a group) are this implementation's.

When to use: the student must keep its own tokenizer (a pretrained student from another family, or a fresh
student with a smaller vocabulary: ``student.tokenizer``). ``llm_kd`` with ``loss: uld`` is the simpler
alternative (ULD on positions paired in order, no alignment).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import KDistillError, expect
from ..losses.cross_tokenizer import shared_vocab_kl, span_kl
from ..losses.logits import TEMPERATURE_POWER, log_probs, uld
from ..losses.reduce import kd_scale, masked_mean
from ..registry import METHODS
from .base import Method, ModelOutput, label_loss, require_teacher


def _rows(logits: Tensor, positions: Tensor) -> Tensor:
    """``logits[b, positions[b, g]]`` -> ``(B, G, V)`` (negative positions read row 0; mask them)."""
    idx = positions.clamp_min(0).unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    return logits.gather(1, idx)


def _span_log_probs(logp: Tensor, targets: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """``(B, G)`` sum over the positions of each group of the log-probability of the token that follows."""
    tok = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    keep = groups >= 0
    out = tok.new_zeros((groups.shape[0], num_groups))
    return out.scatter_add(1, groups.clamp_min(0), torch.where(keep, tok, torch.zeros_like(tok)))


@METHODS.register("cross_tokenizer_kd")
class CrossTokenizerKD(Method):
    """Cross-tokenizer distillation: shared-vocabulary KL on exactly aligned tokens, chain probabilities and ULD on
    the spans the tokenisations cut differently (see the module docstring)."""

    def __init__(self, kd_temperature: float = 1.0, matched_weight: float = 1.0, merged_weight: float = 1.0,
                 uld_weight: float = 1.0, ce_weight: float = 0.0) -> None:
        super().__init__()
        expect(kd_temperature > 0, "cross_tokenizer_kd kd_temperature", kd_temperature, "a positive number")
        for name, w in (("matched_weight", matched_weight), ("merged_weight", merged_weight),
                        ("uld_weight", uld_weight), ("ce_weight", ce_weight)):
            expect(w >= 0, f"cross_tokenizer_kd {name}", w, "a number >= 0")
        expect(matched_weight + merged_weight + uld_weight + ce_weight > 0, "cross_tokenizer_kd weights",
               (matched_weight, merged_weight, uld_weight, ce_weight), "at least one positive weight")
        self.kd_temperature = float(kd_temperature)
        self.matched_weight, self.merged_weight = float(matched_weight), float(merged_weight)
        self.uld_weight, self.ce_weight = float(uld_weight), float(ce_weight)
        self.register_buffer("map_student", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("map_teacher", torch.zeros(0, dtype=torch.long), persistent=False)

    @property
    def cross_tokenizer(self) -> bool:
        return True

    def set_vocab_map(self, student_ids: Tensor, teacher_ids: Tensor) -> None:
        if student_ids.shape != teacher_ids.shape or student_ids.ndim != 1:
            raise KDistillError(f"cross_tokenizer_kd.set_vocab_map: got {tuple(student_ids.shape)} and "
                                f"{tuple(teacher_ids.shape)}; expected two (M,) id tensors of paired tokens.")
        self.map_student = student_ids.long().to(self.map_student.device)
        self.map_teacher = teacher_ids.long().to(self.map_teacher.device)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher = require_teacher("cross_tokenizer_kd", teacher)
        zs, zt, T = student.logits, teacher.logits, self.kd_temperature
        if zs is None or zt is None:
            raise KDistillError("cross_tokenizer_kd: expected student and teacher logits; got none for "
                                f"{'the student' if zs is None else 'the teacher'} (a top-k cache or a fused head "
                                "cannot serve this method).")
        kl_scale = kd_scale(T, power=TEMPERATURE_POWER["forward_kl"])
        out: dict[str, Tensor] = {}
        if "group_exact" not in batch:  # one tokenizer: every position is an exact group, the whole vocabulary shared
            if zs.shape != zt.shape:
                raise KDistillError(f"cross_tokenizer_kd: logits {tuple(zs.shape)} (student) and {tuple(zt.shape)} "
                                    "(teacher) with no alignment in the batch; expected a cross-tokenizer batch "
                                    "(kdistill.data.align.cross_blocks) or one tokenizer for both.")
            ids = torch.arange(zs.shape[-1], device=zs.device)
            per = shared_vocab_kl(zs, zt, student_ids=ids, teacher_ids=ids, kd_temperature=T)
            out["matched"] = self.matched_weight * kl_scale * masked_mean(per, batch.get("mask"))
        else:
            present = batch["group_student_start"] >= 0
            exact = present & batch["group_exact"]
            merged = present & ~batch["group_exact"]
            s_rows = _rows(zs, batch["group_student_start"])
            t_rows = _rows(zt, batch["group_teacher_start"])
            if self.matched_weight:
                if not self.map_student.numel():
                    raise KDistillError("cross_tokenizer_kd: no vocabulary map; expected set_vocab_map(student_ids, "
                                        "teacher_ids) before training (the llm task calls it with "
                                        "kdistill.data.align.vocab_map).")
                per = shared_vocab_kl(s_rows, t_rows, student_ids=self.map_student, teacher_ids=self.map_teacher,
                                      kd_temperature=T)
                out["matched"] = self.matched_weight * kl_scale * masked_mean(per, exact)
            if self.merged_weight:
                t_ids = batch["teacher_input_ids"]
                t_next = torch.cat([t_ids[:, 1:], t_ids[:, -1:]], 1)  # the token each teacher position predicts
                G = present.shape[1]
                s_span = _span_log_probs(log_probs(zs, T), batch["labels"], batch["student_group"], G)
                t_span = _span_log_probs(log_probs(zt, T), t_next, batch["teacher_group"], G)
                out["merged"] = self.merged_weight * kl_scale * masked_mean(span_kl(s_span, t_span), merged)
            if self.uld_weight:
                per = uld(s_rows, t_rows, kd_temperature=T)
                out["uld"] = self.uld_weight * kd_scale(T, power=TEMPERATURE_POWER["uld"]) * masked_mean(per, merged)
            n = present.sum().clamp_min(1)
            self.log("exact_share", exact.sum() / n)
        if self.ce_weight:
            out["ce"] = self.ce_weight * label_loss(zs, batch)
        return out
