import pytest
import torch
from torch import nn

from kdistill.capture import capture
from kdistill.errors import UnknownNameError
from kdistill.models import build_cnn, build_mlp


def n_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_capture_records_and_removes_hooks():
    m = build_cnn((40,), 10, width=8, depth=3)
    with capture(m, ["blocks.1", "embed"]) as feats:
        m(torch.randn(2, 40))
        assert n_hooks(m) == 2
    assert feats["blocks.1"].shape[:2] == (2, 8)
    assert feats["embed"].shape == (2, 16)
    assert n_hooks(m) == 0


def test_hooks_removed_after_error():
    m = build_mlp((5,), 3)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(m, ["blocks.0"]):
            m(torch.randn(1, 5))
            raise RuntimeError("boom")
    assert n_hooks(m) == 0


def test_unknown_layer_lists_close_matches_and_registers_nothing():
    m = build_mlp((5,), 3, depth=2)
    with pytest.raises(UnknownNameError, match="blocks.1") as e:
        with capture(m, ["blocks.0", "block.1"]):
            pass
    assert "Did you mean" in str(e.value)
    assert n_hooks(m) == 0


def test_detach_for_teacher():
    m = build_mlp((5,), 3)
    with capture(m, ["blocks.0"], detach=True) as f:
        m(torch.randn(2, 5))
    assert not f["blocks.0"].requires_grad
    with capture(m, ["blocks.0"]) as f:
        m(torch.randn(2, 5))
    assert f["blocks.0"].requires_grad


def test_capture_through_ddp_style_wrapper():
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

        def forward(self, x):
            return self._orig_mod(x)

    inner = build_mlp((5,), 3)
    with capture(Wrapper(inner), ["head"]) as f:
        Wrapper(inner)(torch.randn(2, 5))
    assert f["head"].shape == (2, 3)
