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


def test_names_resolve_through_activation_checkpoint_wrappers():
    """Activation checkpointing (as FSDP setups apply it per layer) puts `_checkpoint_wrapped_module` into the paths;
    the model's own names still resolve, to the wrapped modules, and features match the unwrapped model's."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from kdistill.capture import attention_layers, resolve_modules

    torch.manual_seed(0)
    plain = build_mlp((5,), 3, width=8, depth=2)
    wrapped = build_mlp((5,), 3, width=8, depth=2)
    wrapped.load_state_dict(plain.state_dict())
    wrapped.blocks[1] = checkpoint_wrapper(wrapped.blocks[1])
    assert "blocks.1._checkpoint_wrapped_module.0" in dict(wrapped.named_modules())
    resolved = resolve_modules(wrapped, ["blocks.1", "blocks.1.0"])
    assert resolved["blocks.1"] is wrapped.blocks[1]._checkpoint_wrapped_module
    assert isinstance(resolved["blocks.1.0"], nn.Linear)
    x = torch.randn(4, 5)
    with capture(plain, ["blocks.1.0", "blocks.1"]) as a:
        plain(x)
    with capture(wrapped, ["blocks.1.0", "blocks.1"]) as b:
        wrapped(x)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert n_hooks(wrapped) == 0
    with pytest.raises(UnknownNameError) as e:
        resolve_modules(wrapped, ["blocks.1.1.0"])
    assert "_checkpoint_wrapped_module" not in str(e.value) and "'blocks.1.0'" in str(e.value)
    # a Llama with its first decoder layer wrapped: attention layers are found under their own names
    from kdistill.teachers.tiny import tiny_llama

    lm = tiny_llama(64, hidden_size=32, num_layers=2, num_heads=4)
    lm.model.layers[0] = checkpoint_wrapper(lm.model.layers[0])
    found = attention_layers(lm)
    assert [x.q for x in found] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert found[0].block == "model.layers.0" and found[0].head_dim == 8
