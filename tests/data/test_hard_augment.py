import numpy as np
import pytest
import torch

from kdistill.data.hard_augment import HardAugment, _augment
from kdistill.data.loaders import TensorDictDataset, make_loader
from kdistill.errors import KDistillError
from kdistill.methods.hinton_kd import HintonKD
from kdistill.models.classifiers import build_cnn, build_mlp


def _models():
    torch.manual_seed(0)
    return build_mlp((40,), 10, width=16, depth=1), build_cnn((40,), 10, width=8, depth=2)


def test_unbound_and_bad_options_raise():
    with pytest.raises(KDistillError, match="bind"):
        HardAugment()({"inputs": torch.randn(2, 40)}, np.random.default_rng(0))
    with pytest.raises(KDistillError, match="ops"):
        HardAugment(ops=["rotate"])
    with pytest.raises(KDistillError):
        HardAugment(num_candidates=0)


def test_ops_shapes_and_semantics():
    rng = np.random.default_rng(0)
    x = torch.randn(5, 40)
    for op in ("noise", "shift", "scale", "mask"):
        assert _augment(x, op, rng, 1.0).shape == x.shape
    shifted = _augment(x, "shift", rng, 1.0)
    torch.testing.assert_close(shifted.sort(1).values, x.sort(1).values)  # a roll keeps every value
    masked = _augment(torch.ones(5, 40), "mask", rng, 1.0)
    assert ((masked == 0).sum(1) == 10).all()  # a window of 25% of the length
    ratio = _augment(torch.ones(5, 40), "scale", rng, 1.0)[:, 0]
    assert ((ratio >= 0.5) & (ratio <= 1.5)).all()
    img = torch.randn(2, 1, 6, 6)
    assert _augment(img, "shift", rng, 1.0).shape == img.shape


def test_keeps_the_most_disagreeing_candidate_per_example():
    student, teacher = _models()
    aug = HardAugment(num_candidates=5).bind(student=student, teacher=teacher)
    x = torch.randn(8, 40)
    out = aug({"inputs": x, "labels": torch.zeros(8).long()}, np.random.default_rng(1))
    chosen = aug.disagreement(out["inputs"])
    assert (chosen >= aug.disagreement(x) - 1e-6).all()  # never worse than the unaugmented input
    assert chosen.mean().item() == pytest.approx(out["hard_disagreement"], rel=1e-5)
    again = aug({"inputs": x, "labels": torch.zeros(8).long()}, np.random.default_rng(1))
    torch.testing.assert_close(again["inputs"], out["inputs"])  # the loop's rng makes it reproducible


def test_student_mode_and_batchnorm_statistics_untouched():
    teacher, student = _models()[0], build_cnn((40,), 10, width=8, depth=2).train()
    stats = [b.clone() for b in student.buffers()]
    HardAugment().bind(student=student, teacher=teacher)({"inputs": torch.randn(4, 40)}, np.random.default_rng(0))
    assert student.training
    assert all(torch.equal(a, b) for a, b in zip(stats, student.buffers()))


def test_three_step_fit_with_hard_augment():
    from kdistill.train.loop import fit, make_accelerator

    student, teacher = _models()
    g = torch.Generator().manual_seed(0)
    data = TensorDictDataset(inputs=torch.randn(48, 40, generator=g), labels=torch.randint(0, 10, (48,), generator=g))
    aug = HardAugment(num_candidates=2).bind(student=student, teacher=teacher)
    res = fit(student=student, method=HintonKD(), teacher=teacher, train_loader=make_loader(data, 16),
              accelerator=make_accelerator("no"), augment=aug, progress=False, epochs=1, max_steps=3)
    assert res.steps == 3
