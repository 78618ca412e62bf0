import pytest
import torch

import kdistill.models  # noqa: F401  (registers the model families)
from kdistill.capture import capture
from kdistill.errors import KDistillError
from kdistill.registry import MODELS


def test_registered_shapes_and_hookable_tokens():
    m = MODELS.get("transformer1d")((40,), 10, dim=16, depth=2, heads=2, patch_size=4)
    with capture(m, ["blocks.0", "blocks.1", "embed"]) as f:
        out = m(torch.randn(3, 40))
    assert out.shape == (3, 10)
    assert f["blocks.1"].shape == (3, 10, 16) and f["embed"].shape == (3, 16)
    m2 = MODELS.get("transformer1d")((2, 12), 3, dim=8, depth=1, heads=2, patch_size=3)  # (C, L) input
    assert m2(torch.randn(4, 2, 12)).shape == (4, 3)


def test_trains_and_rejects_bad_shapes():
    torch.manual_seed(0)
    m = MODELS.get("transformer1d")((8,), 2, dim=8, depth=1, heads=2, patch_size=2)
    x, y = torch.randn(32, 8), (torch.randn(32, 8)[:, 0] > 0).long()
    x[:, 0] = y.float() * 2 - 1  # learnable signal
    opt = torch.optim.Adam(m.parameters(), lr=2e-2)
    first = None
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first * 0.5
    with pytest.raises(KDistillError, match="divisor"):
        MODELS.get("transformer1d")((40,), 10, patch_size=3)
    with pytest.raises(KDistillError, match="multiple of heads"):
        MODELS.get("transformer1d")((40,), 10, dim=10, heads=4)
