import numpy as np
import pytest

from kdistill.blackbox.student import TextStudent, one_hot
from kdistill.errors import KDistillError

TEXTS = [f"a {w} number {i}" for i in range(30) for w in ("dog", "tree")]
LABELS = [0 if "dog" in t else 1 for t in TEXTS]


def test_hard_labels_are_learned():
    st = TextStudent(2, epochs=30, seed=0).fit(TEXTS, one_hot(LABELS, 2))
    assert st.accuracy(TEXTS, LABELS) == 1.0
    assert np.isfinite(st.history[-1])


def test_soft_targets_are_matched_not_argmaxed():
    """With the same soft target q = (0.7, 0.3) for every text, the soft cross-entropy minimiser is p = q;
    a student trained on argmax labels would drive p(class 0) towards 1."""
    q = np.tile(np.array([[0.7, 0.3]], np.float32), (len(TEXTS), 1))
    st = TextStudent(2, epochs=60, lr=1e-2, seed=0).fit(TEXTS, q)
    p = st.predict_proba(TEXTS)[:, 0]
    assert abs(float(p.mean()) - 0.7) < 0.05


def test_empty_training_set_is_a_clear_error():
    with pytest.raises(KDistillError, match="rejected every answer"):
        TextStudent(2).fit([], np.zeros((0, 2), np.float32))
