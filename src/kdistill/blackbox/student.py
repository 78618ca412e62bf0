"""Small text-classifier student for the black-box pipelines.

TF-IDF features (word uni/bi-grams, fitted on the student's training texts) -> the ``mlp`` classifier
from :mod:`kdistill.models.classifiers`, trained with :func:`kdistill.losses.logits.soft_cross_entropy`
against per-example target distributions (one-hot for hard labels, the teacher's renormalised
label probabilities for soft labels). Training runs in :func:`kdistill.train.loop.fit`; the targets
come from the stored teacher answers (``teacher_targets``), so no teacher model runs at training time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..data.loaders import TensorDictDataset, make_loader
from ..errors import expect
from ..losses.logits import soft_cross_entropy
from ..methods.base import ModelOutput
from ..methods.hinton_kd import HintonKD
from ..models.classifiers import MLP, count_params
from ..train.loop import fit, make_accelerator


def one_hot(labels: Sequence[int], num_classes: int) -> np.ndarray:
    out = np.zeros((len(labels), num_classes), dtype=np.float32)
    for i, y in enumerate(labels):
        out[i, int(y)] = 1.0
    return out


class TextStudent:
    """``fit(texts, targets)`` / ``predict(texts)`` / ``accuracy(texts, labels)``."""

    def __init__(self, num_classes: int, *, max_features: int = 4000, width: int = 64, depth: int = 1,
                 epochs: int = 30, lr: float = 3e-3, weight_decay: float = 1e-4, batch_size: int = 64,
                 seed: int = 0) -> None:
        expect(num_classes >= 2, "num_classes", num_classes, ">= 2")
        self.num_classes = num_classes
        self.max_features, self.width, self.depth = max_features, width, depth
        self.epochs, self.lr, self.weight_decay, self.batch_size, self.seed = epochs, lr, weight_decay, batch_size, seed
        self.vectorizer = None
        self.model: MLP | None = None
        self.history: list[float] = []

    def _features(self, texts: Sequence[str]) -> torch.Tensor:
        assert self.vectorizer is not None
        return torch.as_tensor(self.vectorizer.transform(list(texts)).toarray(), dtype=torch.float32)

    def fit(self, texts: Sequence[str], targets: np.ndarray) -> TextStudent:
        """Train on ``texts`` with ``targets`` of shape ``(N, C)`` (rows sum to 1)."""
        from sklearn.feature_extraction.text import TfidfVectorizer

        targets = np.asarray(targets, dtype=np.float32)
        expect(len(texts) == len(targets) > 0, "student training set", (len(texts), len(targets)),
               "as many target rows as texts, and at least one", "The teacher may have rejected every answer.")
        expect(targets.shape[1] == self.num_classes, "targets shape", targets.shape, f"(N, {self.num_classes})")
        torch.manual_seed(self.seed)
        self.vectorizer = TfidfVectorizer(max_features=self.max_features, ngram_range=(1, 2), sublinear_tf=True,
                                          lowercase=True)
        self.vectorizer.fit(list(texts))
        x = self._features(texts)
        q = torch.as_tensor(targets)
        self.model = MLP((x.shape[1],), self.num_classes, width=self.width, depth=self.depth)
        # Training goes through the shared loop with the API teacher's answers as ``teacher_targets``:
        # Hinton KD at T = 1, alpha = 1 is KL(q || p_student) = soft cross-entropy - H(q) (same gradients).
        data = TensorDictDataset(inputs=x, teacher_log_probs=torch.log(q), labels=q.argmax(-1))
        result = fit(student=self.model, method=HintonKD(kd_temperature=1.0, alpha=1.0),
                     train_loader=make_loader(data, self.batch_size, seed=self.seed),
                     accelerator=make_accelerator("no"),
                     teacher_targets=lambda b: ModelOutput(logits=b["teacher_log_probs"]),
                     progress=False, seed=self.seed, epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay,
                     schedule="constant", log_every=10**9)
        self.model = result.student
        self.model.eval()
        with torch.no_grad():
            self.history = [float(soft_cross_entropy(self.model(x), q).mean())]
        return self

    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        expect(self.model is not None, "TextStudent", "unfitted", "a fitted student", "Call fit() first.")
        assert self.model is not None
        return torch.softmax(self.model(self._features(texts)), -1).numpy()

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        return self.predict_proba(texts).argmax(-1)

    def accuracy(self, texts: Sequence[str], labels: Sequence[int]) -> float:
        if not len(texts):
            return float("nan")
        return float((self.predict(texts) == np.asarray(labels)).mean())

    def num_params(self) -> int:
        return 0 if self.model is None else count_params(self.model)
