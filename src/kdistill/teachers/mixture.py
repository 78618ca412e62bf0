"""Several teachers as one: the weighted mean of their predicted distributions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import KDistillError


def mix_log_probs(logits: Sequence[Tensor], weights: Tensor) -> Tensor:
    """``log sum_k w_k softmax(z_k)`` over the last axis, in fp32: the log of the teachers' weighted mixture."""
    logps = [F.log_softmax(z.float(), dim=-1) for z in logits]
    widths = {lp.shape[-1] for lp in logps}
    if len(widths) != 1:
        raise KDistillError(f"TeacherMixture: the teachers predict {sorted(widths)} classes; expected the same.")
    return torch.logsumexp(torch.stack(logps, 0) + weights.log().view(-1, *([1] * logps[0].dim())), 0)


class TeacherMixture(nn.Module):
    """Frozen teachers ``k`` with weights ``w_k`` (normalised to sum to 1) returning the log of their mixture,
    ``log sum_k w_k softmax(z_k)``, as logits ``(B, C)``: every logit-based method then distils the mean of the
    teachers' distributions (at ``kd_temperature`` 1 exactly; a temperature softens or sharpens the mixture).
    The teachers must predict the same classes."""

    def __init__(self, teachers: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if len(teachers) < 2:
            raise KDistillError(f"TeacherMixture: got {len(teachers)} teacher(s), expected at least 2.")
        w = torch.ones(len(teachers)) if weights is None else torch.as_tensor(list(weights), dtype=torch.float32)
        if w.shape != (len(teachers),) or not bool((w > 0).all()):
            raise KDistillError(f"TeacherMixture weights: got {list(map(float, w.reshape(-1)))}, expected "
                                f"{len(teachers)} positive numbers, one per teacher.")
        self.teachers = nn.ModuleList(teachers)
        self.register_buffer("weights", w / w.sum())

    def forward(self, x: Tensor) -> Tensor:
        return mix_log_probs([t(x) for t in self.teachers], self.weights)


class LMTeacherMixture(nn.Module):
    """Several causal LM teachers with one tokenizer as one: ``forward(input_ids, attention_mask)`` returns an
    output whose ``logits`` ``(B, T, V)`` are ``log sum_k w_k softmax(z_k)``, the weighted mean of their next-token
    distributions. ``base`` is the first teacher (students built from a teacher copy it); ``generate`` decodes
    the mixture greedily (the report's side-by-side generations)."""

    def __init__(self, teachers: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.mixture = TeacherMixture(teachers, weights)
        rows = {int(t.get_output_embeddings().weight.shape[0]) for t in teachers}
        if len(rows) != 1:
            raise KDistillError(f"teachers: their LM heads have {sorted(rows)} rows; expected the same vocabulary "
                                "(teachers of one tokenizer, with the same number of logit rows).")

    @property
    def base(self) -> nn.Module:
        return self.mixture.teachers[0]

    @property
    def config(self) -> object:
        return self.base.config

    @property
    def weights(self) -> Tensor:
        return self.mixture.weights

    def get_output_embeddings(self) -> nn.Module:
        return self.base.get_output_embeddings()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: object) -> object:
        from types import SimpleNamespace

        logits = [t(input_ids=input_ids, attention_mask=attention_mask).logits for t in self.mixture.teachers]
        return SimpleNamespace(logits=mix_log_probs(logits, self.mixture.weights))

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 16,
                 **_: object) -> Tensor:
        ids = input_ids
        for _step in range(int(max_new_tokens)):
            nxt = self(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
        return ids
