"""recipes/examples/image_classifier: images from a .npz, Hugging Face image-classifier teacher and students, and
a conv-net student of your own on the same images."""

import json

import numpy as np
import pytest
import torch

CLASSES = ["top_left", "top_right", "bottom"]


def bright_quadrant_images(n, size=12, seed=0):
    """8-bit H x W x 3 images of dim noise with one bright region, which is the class (string labels): the
    top-left quarter in red, the top-right quarter in green or the bottom half in blue."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 60, (n, size, size, 3)).astype(np.uint8)
    h = size // 2
    regions = [(slice(0, h), slice(0, h)), (slice(0, h), slice(h, None)), (slice(h, None), slice(None))]
    for i, c in enumerate(y):
        x[(i, *regions[c], c)] += 150
    return x, np.array(CLASSES)[y]


def write_vit(folder, *, hidden, layers, image_size=16, seed=0, **config):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=image_size, patch_size=4, hidden_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=2, intermediate_size=2 * hidden, num_labels=3, **config)
    ViTForImageClassification(cfg).save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)


def write_models_and_images(folder, n=240):
    write_vit(folder / "teacher_vit", hidden=32, layers=2, seed=2)
    write_vit(folder / "student_vit", hidden=16, layers=1, seed=1)
    x, y = bright_quadrant_images(n)
    np.savez(folder / "shapes.npz", image=x, label=y)
    (folder / "my_cnn.py").write_text('''
from torch import nn


def small_cnn(input_shape, num_classes, width=8):
    """A conv net on (C, H, W) images: two strided convolutions keep where the bright region is."""
    h, w = input_shape[1] // 4, input_shape[2] // 4
    return nn.Sequential(nn.Conv2d(input_shape[0], width, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(width * h * w, num_classes))
''')


def test_images_with_hugging_face_teacher_and_students(tmp_path, example):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from kdistill.data import load_dataset
    from kdistill.exporters.classifier import load_classifier

    write_models_and_images(tmp_path)
    r, rep = example("examples/image_classifier")
    assert r.exit_code == 0, r.output
    assert rep["data"]["num_classes"] == 3 and rep["data"]["input_shape"] == [3, 12, 12]
    assert rep["teacher"]["metrics"]["accuracy"] > 0.9  # where (and which colour) the bright region is
    assert rep["student"]["params"] < rep["teacher"]["params"]
    for fig in ("report.md", "curves.png"):
        assert (tmp_path / "run" / fig).is_file()
    meta = json.loads((tmp_path / "run" / "student" / "model.json").read_text())
    assert meta["class_names"] == sorted(CLASSES)

    # the student is a plain transformers folder too: its labels named, its processor beside it, the same logits
    hf_dir = tmp_path / "run" / "student" / "hf"
    hf = AutoModelForImageClassification.from_pretrained(hf_dir).eval()
    assert hf.config.num_hidden_layers == 1
    assert [hf.config.id2label[i] for i in range(3)] == sorted(CLASSES)
    student, _ = load_classifier(tmp_path / "run" / "student")
    data = load_dataset("files", **meta["data"]["kwargs"])
    x = data.x_test[:8]
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=student.preprocess(x)).logits, student(x))
        # the processor's own (PIL) resize and normalisation give nearly the same inputs as kdistill's torch ones
        processor = AutoImageProcessor.from_pretrained(hf_dir)
        pixels = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        theirs = processor(images=list(pixels), return_tensors="pt")["pixel_values"]
        assert theirs.shape == (8, 3, 16, 16)
        assert (theirs - student.preprocess(x)).abs().mean() < 0.05

    ev = example.cli("eval", "run")
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["metrics"]["accuracy"] == pytest.approx(rep["student"]["metrics"]["accuracy"])
    assert example.cli("export", "run", "--out", "exported").exit_code == 0
    assert (tmp_path / "exported" / "hf" / "preprocessor_config.json").is_file()

    # the trained teacher given as it is (its saved labels matched by name), distilled into your own conv net
    again, rep2 = example("examples/image_classifier", "baseline=false", "train.epochs=8", "train.lr=0.01",
                          "teacher={model: {hf: run/teacher/hf}, train: null}",
                          "student={factory: 'my_cnn:small_cnn', kwargs: {width: 8}}", output="run2")
    assert again.exit_code == 0, again.output
    assert rep2["teacher"]["source"] == "given"
    assert rep2["teacher"]["metrics"]["accuracy"] == pytest.approx(rep["teacher"]["metrics"]["accuracy"])
    assert rep2["student"]["metrics"]["accuracy"] > 0.8  # the conv net learns from the images and the teacher
    cnn, meta2 = load_classifier(tmp_path / "run2" / "student")
    assert meta2["class_names"] == sorted(CLASSES) and cnn(x).shape == (8, 3)
    assert example.cli("eval", "run2").exit_code == 0


def test_pixels_outside_the_unit_range_are_refused_before_training(tmp_path, example):
    write_models_and_images(tmp_path, n=60)
    r, _ = example("examples/image_classifier", "data.image_scale=1")
    assert r.exit_code == 2 and "data.image_scale: 255" in r.output
    assert not (tmp_path / "run" / "teacher").exists()


@pytest.mark.gpu
def test_images_on_cuda_in_bf16(tmp_path, example):
    """The processor's resize and normalisation run on the GPU inside the forward, under bf16 autocast."""
    write_models_and_images(tmp_path, n=120)
    r, rep = example("examples/image_classifier", "train.mixed_precision=bf16", "train.epochs=2",
                     "teacher.train.epochs=2")
    assert r.exit_code == 0, r.output
    for who in ("teacher", "student", "baseline"):
        assert 0.0 <= rep[who]["metrics"]["accuracy"] <= 1.0
    assert example.cli("eval", "run").exit_code == 0
