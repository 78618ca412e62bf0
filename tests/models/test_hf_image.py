"""Hugging Face image classifiers as classification teachers and students (models/hf.py)."""

import json

import pytest
import torch

from kdistill.errors import KDistillError
from kdistill.models.hf import HFImageClassifier, HFSequenceClassifier, build_hf

transformers = pytest.importorskip("transformers")


def _vit(folder, *, image_size=8, channels=3, processor=True, **config):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=image_size, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, num_channels=channels, **{"num_labels": 3, **config})
    ViTForImageClassification(cfg).save_pretrained(folder)
    if processor:
        ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.5] * channels,
                          image_std=[0.25] * channels).save_pretrained(folder)
    return str(folder)


def test_an_image_config_loads_an_image_classifier_with_its_processor(tmp_path):
    path = _vit(tmp_path / "vit")
    model = build_hf((3, 12, 12), 3, path=path).eval()
    assert isinstance(model, HFImageClassifier) and model.training is False
    x = torch.rand(4, 3, 12, 12)
    pixels = model.preprocess(x)
    assert pixels.shape == (4, 3, 8, 8)  # resized to the model's size
    same = torch.rand(2, 3, 8, 8)  # at its size: only the processor's rescale and normalisation
    torch.testing.assert_close(model.preprocess(same), (same - 0.5) / 0.25)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.hf(pixel_values=pixels).logits)
    # a model whose head has another number of labels gets a new one
    assert build_hf((3, 8, 8), 5, path=path)(same).shape == (2, 5)


def test_grey_images_feed_a_three_channel_model_and_other_channels_are_refused(tmp_path):
    path = _vit(tmp_path / "vit")
    grey = build_hf((1, 8, 8), 3, path=path)
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(grey.preprocess(x), grey.preprocess(x.expand(-1, 3, -1, -1)))
    with pytest.raises(KDistillError, match="takes images of 3 channels, the data has 4"):
        build_hf((4, 8, 8), 3, path=path)


def test_a_size_the_model_cannot_take_fails_when_it_is_built(tmp_path):
    path = _vit(tmp_path / "bare", processor=False)  # no preprocessor_config.json: images go in as they are
    model = build_hf((3, 8, 8), 3, path=path)
    assert model.resize is None and model.mean is None
    with pytest.raises(KDistillError, match=r"cannot classify images of shape \(3, 12, 12\).*image processor"):
        build_hf((3, 12, 12), 3, path=path)


def test_text_and_image_models_are_refused_for_the_other_kind_of_data(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    vit = _vit(tmp_path / "vit")
    cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
                     num_labels=3)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "bert")
    with pytest.raises(KDistillError, match="is a 'bert' model, not an image classifier"):
        build_hf((3, 8, 8), 3, path=str(tmp_path / "bert"))
    with pytest.raises(KDistillError, match="is a 'vit' model, not a sequence classifier.*data.image_column"):
        build_hf((2, 6), 3, path=vit)
    assert isinstance(build_hf((2, 6), 3, path=str(tmp_path / "bert")), HFSequenceClassifier)  # text as before
    with pytest.raises(KDistillError, match=r"expected tokenized text \(2, L\) or images \(C, H, W\)"):
        build_hf((1, 2, 3, 4), 3, path=vit)


def test_labels_are_matched_by_name_and_the_saved_folder_names_them(tmp_path):
    from transformers import AutoModelForImageClassification

    path = _vit(tmp_path / "vit", id2label={0: "Dog", 1: "cat", 2: "eel"}, label2id={"Dog": 0, "cat": 1, "eel": 2})
    model = build_hf((3, 8, 8), 3, path=path).eval()
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
        model.match_labels(["cat", "dog", "eel"])  # the data's sorted class names
        torch.testing.assert_close(model(x), before[:, [1, 0, 2]])
    with pytest.raises(KDistillError, match="expected the same names"):
        model.match_labels(["a", "b", "c"])
    model.save_hf(tmp_path / "saved", class_names=["cat", "dog", "eel"])
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "saved").eval()
    assert reloaded.config.id2label == {0: "dog", 1: "cat", 2: "eel"}  # output i of the model keeps its meaning
    assert json.loads((tmp_path / "saved" / "preprocessor_config.json").read_text())["size"] == {"height": 8,
                                                                                                 "width": 8}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=model.preprocess(x)).logits[:, model.order], model(x))


def test_pixels_must_be_in_the_unit_range_when_the_processor_rescales(tmp_path):
    model = build_hf((3, 8, 8), 3, path=_vit(tmp_path / "vit"))
    model.check_inputs(torch.rand(4, 3, 8, 8))
    with pytest.raises(KDistillError, match="image_scale: 255"):
        model.check_inputs(torch.rand(4, 3, 8, 8) * 255)
    bare = build_hf((3, 8, 8), 3, path=_vit(tmp_path / "bare", processor=False))
    bare.check_inputs(torch.rand(4, 3, 8, 8) * 255)  # no processor: the values are the user's to choose


def test_remote_code_stays_off_unless_asked_and_the_path_survives_kwargs():
    from kdistill.tasks.classification import ModelSpec

    spec = ModelSpec.model_validate({"hf": "some/model", "kwargs": {"trust_remote_code": True}})
    assert spec.kwargs == {"trust_remote_code": True, "path": "some/model"}
    assert ModelSpec.model_validate({"hf": "some/model"}).kwargs == {"path": "some/model"}


@pytest.mark.parametrize("kind", ["convnext", "deit", "vit_upsample", "mobilevit"])
def test_the_torch_preprocessing_is_close_to_the_processors_own(tmp_path, kind):
    """Shortest-edge resize + crop_pct (ConvNeXt, ResNet), resize + centre crop (DeiT), upsampling, and a
    channel flip (MobileViT): kdistill's torch steps give nearly the processor's (PIL) pixel values."""
    import numpy as np
    from transformers import (
        AutoImageProcessor,
        ConvNextImageProcessor,
        DeiTImageProcessor,
        MobileViTImageProcessor,
        ResNetConfig,
        ResNetForImageClassification,
        ViTImageProcessor,
    )

    processor = {
        "convnext": lambda: ConvNextImageProcessor(size={"shortest_edge": 24}, crop_pct=0.875),
        "deit": lambda: DeiTImageProcessor(size={"height": 36, "width": 36}, crop_size={"height": 32, "width": 32}),
        "vit_upsample": lambda: ViTImageProcessor(size={"height": 64, "width": 64}),
        "mobilevit": lambda: MobileViTImageProcessor(size={"shortest_edge": 32},
                                                     crop_size={"height": 32, "width": 32}),
    }[kind]()
    torch.manual_seed(0)
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                              num_labels=3)).save_pretrained(tmp_path / "resnet")
    processor.save_pretrained(tmp_path / "resnet")
    pixels = np.random.default_rng(0).integers(0, 256, (4, 40, 30, 3)).astype(np.uint8)
    model = build_hf((3, 40, 30), 3, path=str(tmp_path / "resnet"))
    ours = model.preprocess(torch.as_tensor(pixels).permute(0, 3, 1, 2).float() / 255)
    theirs = AutoImageProcessor.from_pretrained(tmp_path / "resnet")(images=list(pixels),
                                                                      return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().mean() < 0.03
