import numpy as np
import pytest
import torch

from kdistill.data import TensorDictDataset, load_dataset, make_loader
from kdistill.errors import KDistillError
from kdistill.methods.hinton_kd import HintonKD
from kdistill.models.classifiers import build_mlp, predict_logits
from kdistill.teachers.sklearn import SklearnTeacher, fit_sklearn_teacher


@pytest.fixture(scope="module")
def wine():
    return load_dataset("wine")


def test_logits_reproduce_predict_proba(wine):
    t = fit_sklearn_teacher("hist_gradient_boosting", wine.x_train, wine.y_train, wine.num_classes, max_iter=30)
    logits = t(wine.x_test)
    assert logits.shape == (len(wine.y_test), 3) and logits.dtype == torch.float32
    proba = t.estimator.predict_proba(wine.x_test.numpy())
    clipped = np.clip(proba, 1e-6, 1)
    clipped /= clipped.sum(1, keepdims=True)
    np.testing.assert_allclose(torch.softmax(logits, -1).numpy(), clipped, rtol=1e-4, atol=1e-6)
    assert (logits.argmax(1).numpy() == proba.argmax(1)).all()
    assert len(list(t.parameters())) == 0  # nothing for an optimizer to touch


def test_unseen_classes_get_the_floor_and_bad_estimators_raise():
    from sklearn.linear_model import LogisticRegression

    x = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    y = np.array([0, 2] * 15)  # class 1 never seen
    t = SklearnTeacher(LogisticRegression().fit(x, y), num_classes=3)
    p = torch.softmax(t(torch.from_numpy(x)), -1)
    assert torch.all(p[:, 1] < 2e-6) and torch.allclose(p.sum(1), torch.ones(30))
    with pytest.raises(KDistillError, match="predict_proba"):
        SklearnTeacher(object(), 3)
    with pytest.raises(KDistillError, match="not fitted"):
        SklearnTeacher(LogisticRegression(), 3)
    with pytest.raises(KDistillError, match="hist_gradient_boosting"):
        fit_sklearn_teacher("hist_gradient_boost", torch.from_numpy(x), torch.from_numpy(y), 3)


def test_three_step_fit_with_tabular_teacher(wine):
    from kdistill.train.loop import fit, make_accelerator

    teacher = fit_sklearn_teacher("random_forest", wine.x_train, wine.y_train, wine.num_classes, n_estimators=20)
    torch.manual_seed(0)
    student = build_mlp(wine.input_shape, wine.num_classes, width=16, depth=1)
    before = [p.clone() for p in student.parameters()]
    loader = make_loader(TensorDictDataset(inputs=wine.x_train, labels=wine.y_train), 16, seed=0)
    res = fit(student=student, method=HintonKD(alpha=1.0), teacher=teacher, train_loader=loader,
              accelerator=make_accelerator("no"), progress=False, epochs=1, max_steps=3, lr=1e-2)
    assert res.steps == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert torch.isfinite(predict_logits(student, wine.x_test)).all()
