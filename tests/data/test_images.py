"""Images for the classification task from your files: .npz / .npy arrays and columns of nested lists."""

import json

import numpy as np
import pytest
import torch

from kdistill.data import load_dataset
from kdistill.errors import KDistillError


def _images(n=40, shape=(6, 5, 3), seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape)).astype(np.uint8), np.array(["cat", "dog"])[rng.integers(0, 2, n)]


def _load(**kwargs):
    return load_dataset("files", **{"validation_fraction": 0.2, "test_fraction": 0.2, **kwargs})


def test_npz_images_become_channels_first_floats_with_named_classes(tmp_path):
    x, y = _images()
    np.savez(tmp_path / "a.npz", image=x, label=y)
    d = _load(files=str(tmp_path / "a.npz"), image_scale=255)
    assert d.input_shape == (3, 6, 5) and d.x_train.dtype == torch.float32
    assert d.class_names == ["cat", "dog"] and len(d.y_train) + len(d.y_val) + len(d.y_test) == 40
    assert 0.0 <= float(d.x_train.min()) and float(d.x_train.max()) <= 1.0
    # the rows are split by the same seeded shuffle as tables: the test images are those rows, unstandardised
    everything = torch.as_tensor(x).permute(0, 3, 1, 2).float() / 255
    first = d.x_test[0]
    i = next(i for i in range(40) if torch.allclose(everything[i], first))
    assert d.class_names[int(d.y_test[0])] == y[i]
    again = _load(files=str(tmp_path / "a.npz"), image_scale=255)
    assert torch.equal(again.x_test, d.x_test) and torch.equal(again.y_train, d.y_train)


def test_layouts_grey_images_and_integer_labels(tmp_path):
    x, _ = _images(shape=(3, 7, 7))  # C x H x W
    np.savez(tmp_path / "chw.npz", pixels=x, target=np.arange(40) % 3)
    d = _load(files=str(tmp_path / "chw.npz"), image_column="pixels", label_column="target")
    assert d.input_shape == (3, 7, 7) and d.class_names == ["0", "1", "2"]
    assert float(d.x_train.max()) > 1  # image_scale 1: the values as they are
    grey, y = _images(shape=(8, 8))
    np.savez(tmp_path / "grey.npz", image=grey, label=y)
    assert _load(files=str(tmp_path / "grey.npz")).input_shape == (1, 8, 8)
    square, y = _images(shape=(4, 4, 3))  # either layout: told by image_layout
    np.savez(tmp_path / "sq.npz", image=square, label=y)
    with pytest.raises(KDistillError, match="image_layout: HWC"):
        _load(files=str(tmp_path / "sq.npz"))
    d = _load(files=str(tmp_path / "sq.npz"), image_layout="hwc")
    assert d.input_shape == (3, 4, 4)
    with pytest.raises(KDistillError, match="expected one of auto, HWC, CHW"):
        _load(files=str(tmp_path / "sq.npz"), image_layout="NHWC")


def test_npy_images_with_label_files_per_split(tmp_path):
    x, y = _images()
    for split, sl in (("train", slice(0, 30)), ("test", slice(30, 40))):
        np.save(tmp_path / f"x_{split}.npy", x[sl])
        np.save(tmp_path / f"y_{split}.npy", y[sl])
    d = _load(files={"train": str(tmp_path / "x_train.npy"), "test": str(tmp_path / "x_test.npy")},
              label_files={"train": str(tmp_path / "y_train.npy"), "test": str(tmp_path / "y_test.npy")},
              test_fraction=0.3)
    assert len(d.y_test) == 10 and len(d.y_train) + len(d.y_val) == 30
    torch.testing.assert_close(d.x_test, torch.as_tensor(x[30:]).permute(0, 3, 1, 2).float())
    with pytest.raises(KDistillError, match="got no data.label_files"):
        _load(files=str(tmp_path / "x_train.npy"))
    with pytest.raises(KDistillError, match="expected the splits of data.files"):
        _load(files={"train": str(tmp_path / "x_train.npy"), "test": str(tmp_path / "x_test.npy")},
              label_files=str(tmp_path / "y_train.npy"))
    np.save(tmp_path / "y_short.npy", y[:5])
    with pytest.raises(KDistillError, match=r"expected N images \(N, \.\.\.\) and N labels"):
        _load(files=str(tmp_path / "x_train.npy"), label_files=str(tmp_path / "y_short.npy"))


def test_an_image_column_of_nested_lists_in_json_lines_and_parquet(tmp_path):
    x, y = _images(shape=(4, 6))
    rows = [{"pixels": img.tolist(), "label": lab} for img, lab in zip(x, y)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = _load(files=str(tmp_path / "a.jsonl"), image_column="pixels", image_scale=255)
    assert d.input_shape == (1, 4, 6) and d.class_names == ["cat", "dog"]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    p = _load(files=str(tmp_path / "a.parquet"), image_column="pixels", image_scale=255)
    assert torch.equal(p.x_train, d.x_train) and torch.equal(p.y_test, d.y_test)


def _jsonl(tmp_path, images, name="bad.jsonl"):
    rows = [{"image": img, "label": "cat" if i % 2 else "dog"} for i, img in enumerate(images)]
    (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / name)


@pytest.mark.parametrize("bad,match", [
    ([[1, 2], [3, 4], [5, 6]], r"row \d+, column 'image': an image of shape \(3, 2\); expected every image to have "
                               r"the shape of the first, \(2, 2\)"),
    ([[1, 2], [3]], "rows of different lengths or non-numbers"),
    ([["a", "b"], ["c", "d"]], "got values of type <U1"),
    ({"bytes": "...", "path": "a.png"}, "an encoded image"),
    ("img.png", "decode the images to arrays first"),
    ([1, 2, 3, 4], r"got an array of shape \(4,\), expected one image"),
    ([[1, 2], [3, float("nan")]], "NaN or infinite"),
])
def test_bad_images_are_refused_with_their_row(tmp_path, bad, match):
    good = [[[1, 2], [3, 4]]] * 9
    files = _jsonl(tmp_path, [*good, bad])
    with pytest.raises(KDistillError, match=match):
        _load(files=files, image_column="image", validation_fraction=0.0, test_fraction=0.0)


def test_misnamed_arrays_and_columns_and_mixed_inputs_are_refused(tmp_path):
    x, y = _images()
    np.savez(tmp_path / "a.npz", images=x, label=y)
    with pytest.raises(KDistillError, match=r"column 'image' is not in the data\. Did you mean 'images'\?"):
        _load(files=str(tmp_path / "a.npz"))
    with pytest.raises(KDistillError, match="Did you mean 'image'"):
        _load(files=_jsonl(tmp_path, [[[1]]] * 5), image_column="imgs", validation_fraction=0.0, test_fraction=0.0)
    with pytest.raises(KDistillError, match="expected one kind of input"):
        _load(files=str(tmp_path / "a.npz"), image_column="images", feature_columns=["a"])
    with pytest.raises(KDistillError, match="mixes array files"):
        _load(files=[str(tmp_path / "a.npz"), str(tmp_path / "b.csv")])
    with pytest.raises(KDistillError, match="expected label_files only with .npy images"):
        _load(files=str(tmp_path / "a.npz"), image_column="images", label_files=str(tmp_path / "y.npy"))
    with pytest.raises(KDistillError, match="expected a positive number"):
        _load(files=str(tmp_path / "a.npz"), image_column="images", image_scale=0)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}] * 40, dtype=object), allow_pickle=True)
    np.save(tmp_path / "y.npy", y)
    with pytest.raises(KDistillError, match="never unpickles"):
        _load(files=str(tmp_path / "objects.npy"), label_files=str(tmp_path / "y.npy"))


def test_a_misspelt_field_of_your_own_data_names_the_close_ones():
    from kdistill.config import load_config
    from kdistill.errors import ConfigError

    recipe = {"task": "classification", "data": {"files": "a.npz", "image_colum": "image"},
              "teacher": {"model": {"name": "cnn"}}, "student": {"name": "cnn"}}
    with pytest.raises(ConfigError, match="data.image_colum: unknown field of your own data. Did you mean "
                                          "'image_column'"):
        load_config(recipe)
