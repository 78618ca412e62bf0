import numpy as np
import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.io import load_state_dict, save_state_dict_atomic
from kdistill.train.checkpoint import CheckpointManager, flatten_state, rng_state, set_rng_state, unflatten_state


def test_nested_state_roundtrip_without_pickle():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))], lr=0.1)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    state = {"opt": opt.state_dict(), "rng": rng_state(), "t": (1, 2.5, None, "x")}
    skel, tensors = flatten_state(state)
    back = unflatten_state(skel, tensors)
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], state["opt"]["state"][0]["exp_avg"])
    assert back["opt"]["param_groups"][0]["betas"] == state["opt"]["param_groups"][0]["betas"]
    assert back["t"] == (1, 2.5, None, "x")
    set_rng_state(back["rng"])
    a = (torch.rand(1), np.random.rand())
    set_rng_state(state["rng"])
    assert (torch.rand(1), np.random.rand()) == a


def test_manager_keeps_latest_and_prunes(tmp_path):
    m = CheckpointManager(tmp_path, keep=2)
    for s in (1, 2, 3):
        m.save(s, {"w": torch.full((2,), float(s)), "step": s})
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000000002", "step-000000003"]
    assert m.load()["step"] == 3 and torch.equal(m.load()["w"], torch.full((2,), 3.0))


def test_crash_leftovers_are_ignored(tmp_path):
    m = CheckpointManager(tmp_path)
    m.save(1, {"w": torch.ones(1)})
    (tmp_path / ".step-000000002.abc.tmp").mkdir()  # a save killed half-way
    assert m.load()["w"].item() == 1.0
    m.save(2, {"w": torch.zeros(1)})
    assert not list(tmp_path.glob(".step-*.tmp"))


def test_truncated_weights_file_gives_clear_error(tmp_path):
    p = tmp_path / "m.safetensors"
    save_state_dict_atomic(p, {"a": torch.randn(100)})
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(KDistillError, match="truncated"):
        load_state_dict(p)
    with pytest.raises(KDistillError, match="does not exist"):
        load_state_dict(tmp_path / "nope.safetensors")


def test_unreadable_pointer_or_state_is_one_clear_error(tmp_path):
    m = CheckpointManager(tmp_path / "ck")
    d = m.save(3, {"w": torch.ones(2), "step": 3})
    (tmp_path / "ck" / "latest.json").write_text("{garbage")
    with pytest.raises(KDistillError, match="latest.json' is unreadable"):
        m.load()
    (tmp_path / "ck" / "latest.json").write_text('{"step": 3, "dir": "%s"}' % d.name)
    assert m.load()["step"] == 3
    (d / "state.json").write_text((d / "state.json").read_text()[:20])  # truncated
    with pytest.raises(KDistillError, match="state.json' is unreadable or truncated"):
        m.load()
