"""Hugging Face sequence classifiers (BERT, DistilBERT, RoBERTa, MiniLM, ...) as classification teachers and
students: ``{hf: PATH_OR_ID}`` in a recipe.

The classification task feeds every model one tensor of inputs; for text that tensor is ``(B, 2, L)`` int64,
token ids and attention mask stacked (the ``files`` dataset builds it with ``data.text_column``). A given model's
label order is matched to the data's class names when its config names its labels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import KDistillError
from ..registry import MODELS


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"


def _check_source(path: str) -> None:
    p = Path(path)
    if p.exists():
        if not (p / "config.json").is_file():
            raise KDistillError(f"hf model {path!r}: the folder has no config.json; expected a Hugging Face model "
                                "folder (save_pretrained).")
        if not any(p.glob("*.safetensors")):
            raise KDistillError(f"hf model {path!r}: no *.safetensors weights (kdistill loads safetensors only). "
                                "Fix: model.save_pretrained(folder, safe_serialization=True).")
    elif _offline() or path.startswith((".", "/", "~")):
        raise KDistillError(f"hf model {path!r}: no such folder, and hub ids need the network (HF_HUB_OFFLINE is set)"
                            ". Fix: give a local model folder.")


def load_tokenizer(path: str) -> Any:
    """The tokenizer of a Hugging Face model folder or hub id, with one clear error."""
    from transformers import AutoTokenizer

    if not Path(path).exists() and (_offline() or path.startswith((".", "/", "~"))):
        raise KDistillError(f"tokenizer {path!r}: no such folder, and hub ids need the network (HF_HUB_OFFLINE is "
                            "set). Fix: give a local folder with tokenizer files.")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise KDistillError(f"tokenizer {path!r}: cannot be loaded ({type(e).__name__}: {str(e)[:200]}); expected a "
                            "folder or hub id with tokenizer files.") from None


class HFSequenceClassifier(nn.Module):
    """A ``transformers`` sequence classifier behind the classification task's one-tensor interface:
    ``forward(x)`` with ``x`` ``(B, 2, L)`` = (input_ids, attention_mask) returns logits ``(B, C)`` in the data's
    class order. Hook its layers by their ``hf.`` names (e.g. ``hf.bert.encoder.layer.1``)."""

    def __init__(self, model: nn.Module, source: str) -> None:
        super().__init__()
        self.hf = model
        self.source = source
        self.register_buffer("order", torch.arange(int(model.config.num_labels)), persistent=False)

    @property
    def label_names(self) -> list[str] | None:
        """The model's own label names, or None when its config only numbers them (LABEL_0, ...)."""
        names = [str(self.hf.config.id2label[i]) for i in range(int(self.hf.config.num_labels))]
        return None if all(n.upper() == f"LABEL_{i}" for i, n in enumerate(names)) else names

    def match_labels(self, class_names: Sequence[str]) -> None:
        """Reorder the outputs to ``class_names`` when the model names its labels (case-insensitive); refuse
        names that do not match."""
        own = self.label_names
        if own is None:
            return
        key = {n.lower(): i for i, n in enumerate(own)}
        missing = [c for c in class_names if c.lower() not in key]
        if missing or len(own) != len(class_names):
            raise KDistillError(f"hf model {self.source!r} predicts labels {own}, the data has classes "
                                f"{list(class_names)}; expected the same names. Fix the label column, or use a "
                                "model trained on these classes.")
        self.order = torch.tensor([key[c.lower()] for c in class_names], device=self.order.device)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1] != 2:
            raise KDistillError(f"hf classifier: got inputs of shape {tuple(x.shape)}, expected (B, 2, L) token ids "
                                "and attention mask (set data.text_column so the data is tokenized).")
        x = x.long()
        return self.hf(input_ids=x[:, 0], attention_mask=x[:, 1]).logits[:, self.order]

    def check_tokenizer(self, tokenizer: str) -> None:
        """Refuse data tokenized by another tokenizer than this model's own (when its folder carries one)."""
        from ..teachers.cache import tokenizer_hash

        if tokenizer == self.source:
            return
        try:
            own = load_tokenizer(self.source)
        except KDistillError:
            return  # the folder has no tokenizer files: the data's tokenizer is the one to use
        if tokenizer_hash(own) != tokenizer_hash(load_tokenizer(tokenizer)):
            raise KDistillError(f"hf model {self.source!r} has its own tokenizer, and the data was tokenized by "
                                f"{tokenizer!r}, another one; token ids would mean other words. Fix: use a teacher "
                                "and student that share a tokenizer (or set data.tokenizer to this model's).")

    def example_inputs(self, n: int, length: int, *, seed: int = 0) -> Tensor:
        """``(n, 2, length)`` random token ids (within the vocabulary) with a full attention mask."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, int(self.hf.config.vocab_size), (n, length), generator=g)
        return torch.stack([ids, torch.ones_like(ids)], 1)

    def save_hf(self, folder: str | Path) -> None:
        """The model (in the data's class order as it is) and its tokenizer as a plain Hugging Face folder."""
        self.hf.save_pretrained(folder, safe_serialization=True)
        try:
            load_tokenizer(self.source).save_pretrained(folder)
        except KDistillError:
            pass  # a model folder without tokenizer files: the data's tokenizer is named in model.json


@MODELS.register("hf")
def build_hf(input_shape: Sequence[int], num_classes: int, path: str = "") -> HFSequenceClassifier:
    """A Hugging Face sequence classifier from a folder or (online) a hub id, loaded from safetensors with
    ``num_classes`` labels (a model with another number gets a new classification head). Text inputs only:
    ``(2, L)`` token ids and attention mask."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if len(input_shape) != 2 or input_shape[0] != 2:
        raise KDistillError(f"hf model {path!r}: the data gives inputs of shape {tuple(input_shape)}, expected "
                            "tokenized text (2, L). Fix: set data.text_column (and data.tokenizer if the models "
                            "do not carry one).")
    _check_source(path)
    try:
        config = AutoConfig.from_pretrained(path)
        same = int(getattr(config, "num_labels", 0)) == int(num_classes)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=int(num_classes), ignore_mismatched_sizes=not same, use_safetensors=True,
            trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise KDistillError(f"hf model {path!r}: cannot be loaded as a sequence classifier ({type(e).__name__}: "
                            f"{str(e)[:200]}).") from None
    return HFSequenceClassifier(model, path)
