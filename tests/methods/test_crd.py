import math

import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.losses.relations import contrastive_nce
from kdistill.methods.base import ModelOutput, SetupInfo
from kdistill.methods.crd import CRD
from kdistill.modules.banks import FifoQueue


def test_nce_hand_value_and_direction():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = contrastive_nce(s, s.clone(), nce_temperature=0.5)
    torch.testing.assert_close(v, torch.full((2,), math.log(1 + math.exp(-2.0))))
    # a negative from the bank that matches the anchor makes the loss larger
    worse = contrastive_nce(s, s.clone(), torch.tensor([[1.0, 0.0]]), nce_temperature=0.5)
    assert worse[0] > v[0] and worse[1].item() == pytest.approx(math.log(1 + 2 * math.exp(-2.0)), rel=1e-5)
    # swapped positives are worse than matched ones
    assert contrastive_nce(s, s.flip(0)).mean() > contrastive_nce(s, s).mean()


def test_bank_is_fifo_and_bounded():
    b = FifoQueue(3, 1)
    b.push(torch.tensor([[1.0], [2.0]]))
    assert b.get().flatten().tolist() == [1.0, 2.0]
    b.push(torch.tensor([[3.0], [4.0]]))
    assert sorted(b.get().flatten().tolist()) == [2.0, 3.0, 4.0]  # 1 was evicted
    b.push(torch.tensor([[5.0], [6.0], [7.0], [8.0]]))
    assert sorted(b.get().flatten().tolist()) == [6.0, 7.0, 8.0]


def test_bank_size_from_num_train_and_state_dict():
    m = CRD(bank_size=4096, embed_dim=8)
    m.setup(SetupInfo({"embed": (2, 5)}, {"embed": (2, 7)}, num_classes=3, num_train=100))
    assert m.teacher_bank.items.shape == (100, 8)
    assert "teacher_bank.items" in m.state_dict() and "student_bank.ptr" in m.state_dict()
    m.train()
    m(ModelOutput(torch.randn(4, 3), {"embed": torch.randn(4, 5)}),
      ModelOutput(torch.randn(4, 3), {"embed": torch.randn(4, 7)}), {"labels": torch.zeros(4).long()})
    assert int(m.teacher_bank.filled) == 4
    m.eval()
    m(ModelOutput(torch.randn(4, 3), {"embed": torch.randn(4, 5)}),
      ModelOutput(torch.randn(4, 3), {"embed": torch.randn(4, 7)}), {"labels": torch.zeros(4).long()})
    assert int(m.teacher_bank.filled) == 4  # evaluation never writes the bank


def test_gradients_reach_both_heads_and_fit_fills_bank(zoo):
    m = CRD(embed_dim=16)
    losses, s, t = zoo["one_backward"](m)
    zoo["assert_grads"](losses, s, t, m)
    assert m.teacher_head.weight.grad.abs().sum() > 0 and m.student_head.weight.grad.abs().sum() > 0
    res, t, before = zoo["fit3"](CRD(embed_dim=16, bank_size=32))
    zoo["assert_fit_ok"](res, t, before)
    assert int(res.method.teacher_bank.filled) == 32  # 3 batches of 16, capped at the bank size


def test_exclude_drops_own_entry_from_negatives():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bank = torch.tensor([[1.0, 0.0]])  # identical to anchor 0's positive
    with_own = contrastive_nce(s, s.clone(), bank, nce_temperature=0.5)
    excluded = contrastive_nce(s, s.clone(), bank, nce_temperature=0.5, exclude=torch.tensor([[True], [False]]))
    torch.testing.assert_close(excluded[0], contrastive_nce(s, s.clone(), nce_temperature=0.5)[0])
    assert excluded[0] < with_own[0] and excluded[1] == with_own[1]


def test_index_memory_bank_momentum_update_and_auto_mode():
    m = CRD(embed_dim=4, num_negatives=8, momentum=0.5, kd_weight=0.0, ce_weight=0.0)
    m.setup(SetupInfo({"embed": (2, 5)}, {"embed": (2, 3)}, num_classes=3, num_train=20))
    assert m.teacher_index_bank.items.shape == (20, 4)
    before = m.teacher_index_bank.items.clone()
    fs, ft = torch.randn(3, 5), torch.randn(3, 3)
    idx = torch.tensor([2, 7, 11])
    m.train()
    m(ModelOutput(torch.randn(3, 3), {"embed": fs}), ModelOutput(torch.randn(3, 3), {"embed": ft}),
      {"labels": torch.zeros(3).long(), "index": idx})
    zt = torch.nn.functional.normalize(m.teacher_head(ft), dim=1).detach()
    expected = torch.nn.functional.normalize(0.5 * before[idx] + 0.5 * zt, dim=1)
    torch.testing.assert_close(m.teacher_index_bank.items[idx], expected)
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(m.teacher_index_bank.items[untouched], before[untouched])
    assert int(m.teacher_bank.filled) == 0  # the FIFO queue is not used when indices are available
    strict = CRD(memory="index", embed_dim=4)
    strict.setup(SetupInfo({"embed": (2, 5)}, {"embed": (2, 3)}, num_classes=3, num_train=20))
    with pytest.raises(KDistillError, match="no 'index'"):
        strict(ModelOutput(torch.randn(1, 3), {"embed": fs[:1]}), ModelOutput(torch.randn(1, 3), {"embed": ft[:1]}),
               {"labels": torch.zeros(1).long()})
    with pytest.raises(KDistillError, match="memory"):
        CRD(memory="bank")


def test_fit_with_dataset_indices_uses_the_index_bank(zoo):
    from kdistill.data.loaders import TensorDictDataset, make_loader
    from kdistill.train.loop import fit, make_accelerator

    data = zoo["random_data"]()
    data["index"] = torch.arange(len(data["labels"]))
    student, teacher = zoo["tiny_model"]("mlp", 1), zoo["tiny_model"]("cnn", 2)
    res = fit(student=student, method=CRD(embed_dim=8, num_negatives=16), teacher=teacher,
              train_loader=make_loader(TensorDictDataset(**data), 16), accelerator=make_accelerator("no"),
              progress=False, epochs=1, max_steps=3)
    assert res.steps == 3 and res.method.teacher_index_bank.items.shape == (48, 8)
    assert int(res.method.teacher_bank.filled) == 0
