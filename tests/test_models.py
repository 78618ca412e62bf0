import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.models import build_cnn, build_mlp, count_params


def test_width_depth_knobs_change_size():
    small, wide, deep = (build_mlp((40,), 10, width=32, depth=1), build_mlp((40,), 10, width=64, depth=1),
                         build_mlp((40,), 10, width=32, depth=3))
    assert count_params(small) < count_params(wide) and count_params(small) < count_params(deep)
    assert count_params(build_mlp((40,), 10, width=128, depth=2)) == 40 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10


@pytest.mark.parametrize("shape", [(40,), (1, 40), (28, 28), (1, 28, 28), (3, 16, 16)])
def test_cnn_accepts_1d_and_2d_inputs(shape):
    m = build_cnn(shape, 7, width=8, depth=3)
    assert m(torch.randn(2, *shape)).shape == (2, 7)
    assert m.dims == (1 if shape in ((40,), (1, 40)) else 2)


def test_bad_knobs():
    with pytest.raises(KDistillError, match="depth"):
        build_mlp((4,), 2, depth=0)
    with pytest.raises(KDistillError, match="mlp"):
        build_cnn((2, 3, 4, 5), 2)
