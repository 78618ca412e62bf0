"""``hyper_sd``: trajectory-segmented consistency distillation, from many segments down to one.

Ren, Xia, Lu, Zhang, Wu, Xie, Wang, Xiao, Wang, Pan, 2024, "Hyper-SD: Trajectory Segmented Consistency Model for
Efficient Image Synthesis" (the TSCD part; its human-feedback and score-distillation stages are not included).

Consistency distillation (``consistency_distillation``) asks one network to map every timestep straight to clean data,
the hardest target. Hyper-SD cuts ``[0, T)`` into ``S`` equal segments -- the spans of the steps of the trailing
``S``-step grid, ``(b_k, b_{k+1}]`` with ``b_0 = -1`` -- and trains the student to map ``z_t`` only to the lower end
``b(t)`` of its own segment, along the DDIM trajectory its prediction implies::

    f(z, t) = alpha_b x_hat(z, t) + sigma_b eps_hat(z, t)           (b = b(t_{n+1}), the student timestep's segment)
    L       = d( f_student(z_{t_{n+1}}, t_{n+1}),  f_target(z_hat_{t_n}, t_n) )

with the same teacher step, EMA target and distance as consistency distillation (one loss function,
:func:`kdistill.losses.diffusion.consistency_loss`, with a ``boundary`` argument). ``f(z, b) = z``, so pairs that
reach their segment's boundary take the teacher's ODE step itself as the target. Stages shrink the number of segments
(``segments``, default 8 -> 4 -> 2 -> 1) on equal shares of the step budget; the teacher is the run's (guided) teacher
in every stage, and the student and its EMA target carry over from one stage to the next. The last stage has one
segment, i.e. plain consistency distillation, so the student samples with the ``consistency`` sampler.

When to use: instead of ``consistency_distillation`` when one-step consistency training from the teacher is unstable
or slow to converge: the early stages learn short, easy segment maps that are each a few-step sampler on their own.
``num_intervals`` must be a multiple of every segment count (boundaries on the grid).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import expect
from ..registry import METHODS
from .base import DiffusionStage
from .consistency_distillation import ConsistencyDistillation


@METHODS.register("hyper_sd")
class HyperSD(ConsistencyDistillation):
    """Consistency distillation to segment boundaries, with fewer segments at each stage (8 -> 4 -> 2 -> 1)."""

    diffusion_sampler = "consistency"
    _name = "hyper_sd"

    def __init__(self, segments: Sequence[int] = (8, 4, 2, 1), num_intervals: int = 40, ema_decay: float = 0.95,
                 distance: str = "l2", huber_c: float | None = None, weight: float = 1.0) -> None:
        super().__init__(num_intervals=num_intervals, ema_decay=ema_decay, distance=distance, huber_c=huber_c,
                         weight=weight)
        segs = tuple(segments) if isinstance(segments, Sequence) and not isinstance(segments, str) else ()
        expect(bool(segs) and all(isinstance(s, int) and s >= 1 for s in segs), "hyper_sd segments", segments,
               "a list of positive integers, e.g. [8, 4, 2, 1]")
        expect(all(a > b for a, b in zip(segs, segs[1:])) and segs[-1] == 1, "hyper_sd segments", list(segs),
               "strictly decreasing counts that end with 1 (the last stage is plain consistency distillation, which "
               "the consistency sampler needs)", "Fix: e.g. segments: [8, 4, 2, 1].")
        lcm = math.lcm(*segs)
        expect(self.num_intervals % lcm == 0, "hyper_sd num_intervals", self.num_intervals,
               f"a multiple of every segment count {list(segs)}, so that segment boundaries lie on the grid",
               f"Fix: num_intervals: {lcm * math.ceil(self.num_intervals / lcm)} (or another multiple of {lcm}).")
        self.segments = segs
        self.num_segments = segs[0]

    def diffusion_stages(self) -> list[DiffusionStage]:
        return [DiffusionStage(f"segments_{s}", teacher="teacher") for s in self.segments]

    def set_diffusion_stage(self, index: int) -> None:
        expect(0 <= index < len(self.segments), "hyper_sd stage", index, f"an index in [0, {len(self.segments)})")
        self.num_segments = self.segments[index]
