import pytest
import torch
import torch.nn.functional as F

from kdistill.data import TensorDictDataset, make_loader
from kdistill.methods.base import ModelOutput
from kdistill.methods.none import NoTeacher
from kdistill.models import build_mlp
from kdistill.train import fit, make_accelerator

from ._tiny import tiny_data


def test_is_cross_entropy_and_needs_no_teacher():
    s, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    assert (NoTeacher()(ModelOutput(s), None, {"labels": y})["ce"].item()
            == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6))
    assert NoTeacher.needs_teacher is False


def test_three_step_run_without_teacher():
    x, y = tiny_data()
    student = build_mlp((40,), 10, width=8, depth=1)
    res = fit(student=student, method=NoTeacher(), train_loader=make_loader(TensorDictDataset(inputs=x, labels=y), 16),
              accelerator=make_accelerator(), max_steps=3, progress=False)
    assert res.steps == 3
