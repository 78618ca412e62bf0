"""Projectors that map student features to the teacher's feature shape."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import KDistillError


class FeatureProjector(nn.Module):
    """A learned map from student features ``(B, Cs, *spatial_s)`` to teacher features
    ``(B, Ct, *spatial_t)``: Linear for vectors, 1x1 Conv1d/Conv2d (+ batch norm) for maps, and
    adaptive average pooling when the spatial sizes differ.
    """

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        s, t = tuple(student_shape), tuple(teacher_shape)
        if len(s) != len(t) and not (len(s) == 2 or len(t) == 2):
            raise KDistillError(
                f"FeatureProjector: student feature shape {s} and teacher shape {t} have different ranks; "
                "expected both (B, C), both (B, C, L) or both (B, C, H, W). Pick layers of the same kind."
            )
        self.student_shape, self.teacher_shape = s, t
        self.flatten = len(s) != len(t)
        if self.flatten or len(t) == 2:
            s_dim = 1
            for d in s[1:]:
                s_dim *= d
            t_dim = 1
            for d in t[1:]:
                t_dim *= d
            self.proj: nn.Module = nn.Linear(s_dim, t_dim)
        elif len(t) == 3:
            self.proj = nn.Sequential(nn.Conv1d(s[1], t[1], 1, bias=False), nn.BatchNorm1d(t[1]))
        elif len(t) == 4:
            self.proj = nn.Sequential(nn.Conv2d(s[1], t[1], 1, bias=False), nn.BatchNorm2d(t[1]))
        else:
            raise KDistillError(f"FeatureProjector: unsupported feature rank {len(t)} (shape {t}).")

    def forward(self, x: Tensor) -> Tensor:
        t = self.teacher_shape
        if self.flatten or len(t) == 2:
            return self.proj(x.flatten(1)).view(x.shape[0], *t[1:])
        y = self.proj(x)
        if tuple(y.shape[2:]) != tuple(t[2:]):
            pool = F.adaptive_avg_pool1d if len(t) == 3 else F.adaptive_avg_pool2d
            y = pool(y, t[2:] if len(t) == 4 else t[2])
        return y
