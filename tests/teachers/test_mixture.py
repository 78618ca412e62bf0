import math

import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.teachers.mixture import TeacherMixture


class Fixed(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.register_buffer("z", torch.tensor(logits))

    def forward(self, x):
        return self.z.expand(len(x), -1)


def test_mixture_is_the_weighted_mean_of_the_distributions():
    a, b = Fixed([2.0, 0.0, -1.0]), Fixed([-1.0, 1.0, 3.0])
    mix = TeacherMixture([a, b], weights=[3.0, 1.0])
    p = torch.softmax(mix(torch.zeros(2, 1)), -1)
    want = 0.75 * torch.softmax(a.z, -1) + 0.25 * torch.softmax(b.z, -1)
    torch.testing.assert_close(p, want.expand(2, -1))
    assert math.isclose(float(p.sum(-1)[0]), 1.0, rel_tol=1e-6)
    same = TeacherMixture([a, Fixed([2.0, 0.0, -1.0])])  # equal teachers: the teacher itself
    torch.testing.assert_close(torch.softmax(same(torch.zeros(1, 1)), -1), torch.softmax(a.z, -1)[None])


def test_mixture_rejects_bad_weights_and_other_class_counts():
    with pytest.raises(KDistillError, match="positive"):
        TeacherMixture([Fixed([0.0, 1.0]), Fixed([1.0, 0.0])], weights=[1.0, 0.0])
    with pytest.raises(KDistillError, match="at least 2"):
        TeacherMixture([Fixed([0.0, 1.0])])
    with pytest.raises(KDistillError, match="same"):
        TeacherMixture([Fixed([0.0, 1.0]), Fixed([1.0, 0.0, 2.0])])(torch.zeros(1, 1))
