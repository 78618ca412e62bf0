"""recipes/examples/csv_classifier: a CSV and a student factory of the user's, from the command line."""

import json

import pytest

MODULE = '''
import torch
from torch import nn


class SmallNet(nn.Module):
    def __init__(self, n_in, n_out, hidden):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x):
        return self.head(self.body(x))


def small_net(input_shape, num_classes, hidden=8):
    return SmallNet(input_shape[0], num_classes, hidden)
'''


def write_table(folder):
    from sklearn.datasets import load_iris

    iris = load_iris()
    names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    lines = [",".join(names + ["species"])]
    lines += [",".join(f"{v:.1f}" for v in row) + f",{iris.target_names[y]}" for row, y in zip(iris.data, iris.target)]
    (folder / "my_table.csv").write_text("\n".join(lines) + "\n")
    (folder / "my_models.py").write_text(MODULE)


def test_csv_table_with_a_factory_student_runs_evaluates_and_exports(tmp_path, example):
    write_table(tmp_path)
    r, rep = example("examples/csv_classifier")
    assert r.exit_code == 0, r.output
    assert rep["data"]["train"] + rep["data"]["val"] + rep["data"]["test"] == 150
    assert rep["data"]["num_classes"] == 3 and rep["teacher"]["metrics"]["accuracy"] > 0.8
    assert rep["student"]["params"] == 4 * 8 + 8 + 8 * 3 + 3  # the user's module, as built by small_net
    meta = json.loads((tmp_path / "run" / "student" / "model.json").read_text())
    assert meta["class_names"] == ["setosa", "versicolor", "virginica"] and meta["model"] == "factory"
    ev = example.cli("eval", "run")
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.output)["metrics"]["accuracy"] == pytest.approx(rep["student"]["metrics"]["accuracy"])
    assert example.cli("export", "run", "--out", "exported").exit_code == 0


def test_a_misspelt_column_or_factory_fails_before_training(tmp_path, example):
    write_table(tmp_path)
    r, _ = example("examples/csv_classifier", "data.label_column=specis")
    assert r.exit_code == 2 and "Did you mean 'species'" in r.output and "Traceback" not in r.output
    r, _ = example("examples/csv_classifier", "student.factory=my_models:tiny_net", output="run2")
    assert r.exit_code == 2 and "has no 'tiny_net'" in r.output
    assert not (tmp_path / "run2" / "teacher").exists()  # refused before the teacher trained
    (tmp_path / "my_table.csv").write_text("sepal_length,species\n5.1,setosa\nbroken,virginica\n" * 10)
    r, _ = example("examples/csv_classifier", output="run3")
    assert r.exit_code == 2 and "expected a number" in r.output
