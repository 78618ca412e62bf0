"""Hugging Face classifiers as classification teachers and students: ``{hf: PATH_OR_ID}`` in a recipe. Sequence
classifiers (BERT, DistilBERT, RoBERTa, MiniLM, ...) for text, image classifiers (ViT, DeiT, ResNet, ConvNeXt,
...) for images; which one is loaded follows the data.

The classification task feeds every model one tensor of inputs; for text that tensor is ``(B, 2, L)`` int64,
token ids and attention mask stacked (the ``files`` dataset builds it with ``data.text_column``); for images
``(B, C, H, W)`` float32 in [0, 1], which each image model resizes and normalises with its own image processor.
A given model's label order is matched to the data's class names when its config names its labels; a saved
model's config names the data's classes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
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


class _HFClassifier(nn.Module):
    """What the text and image wrappers share: the ``transformers`` model under ``hf`` (hook its layers by their
    ``hf.`` names), its label names, and the output order matched to the data's classes."""

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

    def _name_labels(self, class_names: Sequence[str] | None) -> None:
        """Write the data's class names into the model's config (``id2label``), so that the saved folder
        names what each output means; output ``order[j]`` is class ``j``."""
        if not class_names or len(class_names) != int(self.hf.config.num_labels):
            return
        id2label = {int(i): str(c) for i, c in zip(self.order.tolist(), class_names)}
        self.hf.config.id2label = id2label
        self.hf.config.label2id = {c: i for i, c in id2label.items()}


class HFSequenceClassifier(_HFClassifier):
    """A ``transformers`` sequence classifier behind the classification task's one-tensor interface:
    ``forward(x)`` with ``x`` ``(B, 2, L)`` = (input_ids, attention_mask) returns logits ``(B, C)`` in the data's
    class order. Hook its layers by their ``hf.`` names (e.g. ``hf.bert.encoder.layer.1``)."""

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

    def save_hf(self, folder: str | Path, class_names: Sequence[str] | None = None) -> None:
        """The model and its tokenizer as a plain Hugging Face folder, its labels named ``class_names``."""
        self._name_labels(class_names)
        self.hf.save_pretrained(folder, safe_serialization=True)
        try:
            load_tokenizer(self.source).save_pretrained(folder)
        except KDistillError:
            pass  # a model folder without tokenizer files: the data's tokenizer is named in model.json


def _field(obj: Any, key: str) -> Any:
    """``obj[key]`` of a dict or ``obj.key`` of a ``SizeDict``; None when absent."""
    return obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)


#: PIL resampling codes of an image processor -> torch interpolation (LANCZOS, BOX, HAMMING: their nearest kin)
_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bilinear"}


def _interpolation(resample: Any) -> str:
    """A processor's ``resample`` (a PIL code, or a torchvision mode of a fast processor) as a torch mode."""
    if resample is None:
        return "bilinear"
    try:
        return _RESAMPLE.get(int(resample), "bilinear")
    except (TypeError, ValueError):
        name = str(getattr(resample, "value", resample)).lower()
        return next((m for m in ("nearest", "bicubic", "bilinear") if m in name), "bilinear")


class HFImageClassifier(_HFClassifier):
    """A ``transformers`` image classifier (ViT, DeiT, ResNet, ConvNeXt, ...) behind the classification task's
    one-tensor interface: ``forward(x)`` with ``x`` ``(B, C, H, W)`` float images in [0, 1] (pixel / 255) returns
    logits ``(B, classes)`` in the data's class order.

    The model's image processor (``preprocessor_config.json``, when its folder has one) is applied inside the
    forward, in torch, to every batch: resize (and centre crop) to the model's size, the processor's rescale
    (relative to pixel / 255) and its mean / std normalisation. So the data stays one model-independent tensor, a
    teacher and a student may expect other sizes or statistics, and any other student (``cnn``, your factory)
    sees the plain images. Resizing is torch's antialiased interpolation, close to but not bit-equal with the
    processor's PIL resize. Without a processor the images go in as they are. One grey channel is repeated for
    a three-channel model."""

    def __init__(self, model: nn.Module, source: str, input_shape: Sequence[int], processor: Any = None) -> None:
        super().__init__(model, source)
        self.processor = processor
        self.channels = int(getattr(model.config, "num_channels", input_shape[0]))
        c = int(input_shape[0])
        if c != self.channels and not (c == 1 and self.channels == 3):
            raise KDistillError(f"hf model {source!r} takes images of {self.channels} channels, the data has {c} "
                                f"(images of shape {tuple(input_shape)}); expected the same number (one grey channel "
                                "is repeated for three). Fix: data.image_layout if channels and height were swapped, "
                                "or give images of the model's channels.")
        self.resize: tuple[str, int, int] | None = None  # ("exact", H, W) or ("shortest", S, 0)
        self.crop: tuple[int, int] | None = None
        self.mode = "bilinear"
        self.expects_unit = False  # inputs must be in [0, 1] (the processor rescales pixels)
        self.flip_channels = False
        self.factor = 1.0
        mean = std = None
        if processor is not None:
            self.mode = _interpolation(getattr(processor, "resample", None))
            self.flip_channels = bool(getattr(processor, "do_flip_channel_order", False))  # MobileViT: RGB -> BGR
            if getattr(processor, "do_resize", False):
                self.resize, self.crop = self._size_plan(processor)
            if getattr(processor, "do_center_crop", False) and self.crop is None:
                crop = getattr(processor, "crop_size", None)
                self.crop = (int(_field(crop, "height")), int(_field(crop, "width"))) if crop else None
            if getattr(processor, "do_rescale", False):
                self.expects_unit = True
                self.factor = 255.0 * float(getattr(processor, "rescale_factor", 1 / 255))
            if getattr(processor, "do_normalize", False):
                mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
        if mean is not None and std is not None:
            mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
            std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
            if mean_t.shape[0] not in (1, self.channels) or std_t.shape[0] not in (1, self.channels):
                raise KDistillError(f"hf model {source!r}: its image processor normalises {mean_t.shape[0]} channels "
                                    f"and the model takes {self.channels}; expected the same. Fix the folder's "
                                    "preprocessor_config.json (image_mean, image_std).")
            self.register_buffer("mean", mean_t, persistent=False)
            self.register_buffer("std", std_t, persistent=False)
        else:
            self.mean = self.std = None

    def _size_plan(self, processor: Any) -> tuple[tuple[str, int, int], tuple[int, int] | None]:
        size = getattr(processor, "size", None)
        h, w, short = (_field(size, k) if size is not None else None for k in ("height", "width", "shortest_edge"))
        if h and w:
            return ("exact", int(h), int(w)), None
        if short:
            crop_pct = getattr(processor, "crop_pct", None)
            if crop_pct:  # ConvNeXt: below 384, resize the short side to size / crop_pct, then centre crop
                if int(short) < 384:
                    return ("shortest", int(int(short) / float(crop_pct)), 0), (int(short), int(short))
                return ("exact", int(short), int(short)), None
            return ("shortest", int(short), 0), None
        raise KDistillError(f"hf model {self.source!r}: its image processor resizes to {size}, which kdistill does not "
                            "reproduce; expected a size of height and width, or a shortest_edge. Fix: resize the "
                            "images to the model's size yourself and set do_resize: false in its "
                            "preprocessor_config.json.")

    def preprocess(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` images in [0, 1] -> the model's ``pixel_values`` (its processor's steps, in torch)."""
        if x.dim() != 4:
            raise KDistillError(f"hf image classifier {self.source!r}: got inputs of shape {tuple(x.shape)}, "
                                "expected images (B, C, H, W) (data.image_column or .npy / .npz files).")
        x = x.float()
        if x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        if self.resize is not None:
            kind, a, b = self.resize
            h, w = x.shape[-2:]
            if kind == "shortest":
                short, long = (h, w) if h <= w else (w, h)
                a, b = (a, int(a * long / short)) if h <= w else (int(a * long / short), a)
            if (h, w) != (a, b):
                x = nn.functional.interpolate(x, size=(a, b), mode=self.mode,
                                              antialias=self.mode != "nearest" and (a < h or b < w),
                                              **({} if self.mode == "nearest" else {"align_corners": False}))
        if self.crop is not None:
            ch, cw = self.crop
            h, w = x.shape[-2:]
            if (h, w) != (ch, cw):
                top, left = max(0, (h - ch) // 2), max(0, (w - cw) // 2)
                x = x[..., top:top + ch, left:left + cw]
        if self.factor != 1.0:
            x = x * self.factor
        if self.flip_channels:
            x = x.flip(1)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.hf(pixel_values=self.preprocess(x)).logits[:, self.order]

    def check_inputs(self, x: Tensor) -> None:
        """Refuse pixel values outside [0, 1] when the model's processor rescales (it expects pixel / 255)."""
        if self.expects_unit and x.numel() and float(x.max()) > 1.0 + 1e-3:
            raise KDistillError(f"hf model {self.source!r}: the images hold values up to {float(x.max()):.4g}, and its "
                                "image processor expects pixel / 255, in [0, 1]; expected values in [0, 1]. Fix: set "
                                "data.image_scale: 255 for 8-bit pixels (or the images' maximum).")

    def save_hf(self, folder: str | Path, class_names: Sequence[str] | None = None) -> None:
        """The model and its image processor as a plain Hugging Face folder (``AutoModelForImageClassification``
        and ``AutoImageProcessor`` load it), its labels named ``class_names``."""
        self._name_labels(class_names)
        self.hf.save_pretrained(folder, safe_serialization=True)
        if self.processor is not None:
            self.processor.save_pretrained(folder)


def _load_image_processor(path: str) -> Any:
    """The folder's (or hub id's) image processor, or None when it has none."""
    from transformers import AutoImageProcessor
    from transformers.utils import logging as hf_logging

    if Path(path).exists() and not (Path(path) / "preprocessor_config.json").is_file():
        return None
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "falling back to the PIL backend" notice: kdistill resizes in torch
    try:
        return AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError):
        return None  # a hub id without a processor
    except ImportError as e:  # a processor that needs a library: never drop its normalisation silently
        raise KDistillError(f"hf model {path!r}: its image processor cannot be loaded ({e}); expected it to load, "
                            "since its resize and normalisation are part of the model. Fix: install what the "
                            "message names.") from None
    finally:
        hf_logging.set_verbosity(level)


def _family(config: Any) -> tuple[bool, bool]:
    """(is an image classifier, is a sequence classifier) by the config's model type."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", "")
    return kind in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES, kind in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES


@MODELS.register("hf")
def build_hf(input_shape: Sequence[int], num_classes: int, path: str = "",
             trust_remote_code: bool = False) -> HFSequenceClassifier | HFImageClassifier:
    """A Hugging Face classifier from a folder or (online) a hub id, loaded from safetensors with ``num_classes``
    labels (a model with another number gets a new classification head): a sequence classifier for tokenized
    text ``(2, L)`` (``data.text_column``), an image classifier (``AutoModelForImageClassification``, with its
    image processor) for images ``(C, H, W)``. ``trust_remote_code`` runs the folder's own Python: only for
    models you trust."""
    from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification

    shape = tuple(int(d) for d in input_shape)
    images = len(shape) == 3
    if not images and not (len(shape) == 2 and shape[0] == 2):
        raise KDistillError(f"hf model {path!r}: the data gives inputs of shape {shape}, expected tokenized text "
                            "(2, L) or images (C, H, W). Fix: set data.text_column (and data.tokenizer if the "
                            "models do not carry one), or data.image_column / .npy / .npz image files.")
    _check_source(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise KDistillError(f"hf model {path!r}: its config cannot be loaded ({type(e).__name__}: {str(e)[:200]})"
                            + ("" if trust_remote_code else "; a model with its own code needs kwargs: "
                               "{trust_remote_code: true}") + ".") from None
    is_image, is_text = _family(config)
    kind = getattr(config, "model_type", "?")
    if images and not is_image and not trust_remote_code:
        raise KDistillError(f"hf model {path!r} is a {kind!r} model, not an image classifier, and the data gives "
                            f"images {shape}; expected a model that AutoModelForImageClassification loads (ViT, "
                            "DeiT, ResNet, ConvNeXt, ...). Fix: use an image classifier folder.")
    if not images and not is_text and not trust_remote_code:
        raise KDistillError(f"hf model {path!r} is a {kind!r} model, not a sequence classifier, and the data gives "
                            f"tokenized text {shape}; expected a text model"
                            + (". Fix: give images (data.image_column, or .npy / .npz files) instead of "
                               "data.text_column." if is_image else "."))
    auto = AutoModelForImageClassification if images else AutoModelForSequenceClassification
    same = int(getattr(config, "num_labels", 0)) == int(num_classes)
    try:
        model = auto.from_pretrained(path, num_labels=int(num_classes), ignore_mismatched_sizes=not same,
                                     use_safetensors=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise KDistillError(f"hf model {path!r}: cannot be loaded as {'an image' if images else 'a sequence'} "
                            f"classifier ({type(e).__name__}: {str(e)[:200]}).") from None
    if not images:
        return HFSequenceClassifier(model, path)
    wrapped = HFImageClassifier(model, path, shape, _load_image_processor(path))
    was_training = wrapped.training
    try:  # one image through the model now: a size it cannot take fails here, before any training
        with torch.no_grad():
            wrapped.eval()(torch.zeros(1, *shape))
    except (RuntimeError, ValueError) as e:
        size = getattr(config, "image_size", None)
        raise KDistillError(f"hf model {path!r} cannot classify images of shape {shape} ({type(e).__name__}: "
                            f"{str(e)[:200]}); expected images of its size{f' ({size})' if size else ''}. Fix: give "
                            "the folder an image processor that resizes (preprocessor_config.json, e.g. "
                            "AutoImageProcessor.save_pretrained), or resize the images.") from None
    return wrapped.train(was_training)
