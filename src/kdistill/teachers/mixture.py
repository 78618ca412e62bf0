"""Several teachers as one: the weighted mean of their predicted distributions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import KDistillError


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
        logps = [F.log_softmax(t(x).float(), dim=-1) for t in self.teachers]
        widths = {lp.shape[-1] for lp in logps}
        if len(widths) != 1:
            raise KDistillError(f"TeacherMixture: the teachers predict {sorted(widths)} classes; expected the same.")
        stacked = torch.stack(logps, 0) + self.weights.log().view(-1, *([1] * logps[0].dim()))
        return torch.logsumexp(stacked, 0)
