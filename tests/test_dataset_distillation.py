"""Dataset distillation: the losses against hand values and closed forms, the selection rules (Dataset Quantization's
bins, score-based pruning), the distilled-set file, a tiny end-to-end run and its errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdistill.methods  # noqa: F401  (fills the registry)
from kdistill import run
from kdistill.config import load_config
from kdistill.data.distilled import DistilledSet, load_distilled_set, save_distilled_set
from kdistill.data.selection import dq_bins, per_class_random, sample_across_bins, select_by_score
from kdistill.errors import ConfigError, KDistillError
from kdistill.losses.distilled_data import (
    bn_statistics_distance,
    el2n,
    gradient_match_distance,
    kernel_ridge_predictions,
    prediction_margin,
    trajectory_match_loss,
)
from kdistill.methods._distill_data import FlatParams, train_expert, unrolled_sgd
from kdistill.registry import METHODS


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is faster than two, and much faster on a shared machine (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# ---------------------------------------------------------------------------------------------- gradient matching


def test_gradient_match_distance_is_zero_on_identical_gradients():
    g = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(gradient_match_distance(g, g.clone()), torch.zeros(5), atol=1e-6)
    assert torch.allclose(gradient_match_distance(g, 3.0 * g), torch.zeros(5), atol=1e-6)  # direction, not size


def test_gradient_match_distance_hand_case():
    syn = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
    real = torch.tensor([[0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [1.0, 2.0]])
    # orthogonal -> 1, same direction -> 0, opposite -> 2, a zero row counts as orthogonal -> 1
    assert torch.allclose(gradient_match_distance(syn, real), torch.tensor([1.0, 0.0, 2.0, 1.0]), atol=1e-6)
    # a convolution gradient (O, I, k) is O rows of I * k values: rows [1, 0, 0, 1] and [0, 1, 1, 0] vs all-ones
    conv = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])
    expected = 1.0 - 2.0 / (math.sqrt(2.0) * 2.0)
    assert torch.allclose(gradient_match_distance(conv, torch.ones(2, 2, 2)), torch.full((2,), expected), atol=1e-6)
    # biases carry no per-unit direction: DC leaves them out
    assert gradient_match_distance(torch.ones(3), torch.ones(3)).shape == (0,)
    with pytest.raises(KDistillError, match="same parameter"):
        gradient_match_distance(torch.ones(2, 3), torch.ones(3, 2))


# ---------------------------------------------------------------------------------------------- trajectory matching


def _softmax_regression(w0: torch.Tensor) -> nn.Linear:
    model = nn.Linear(w0.shape[1], w0.shape[0], bias=False)
    with torch.no_grad():
        model.weight.copy_(w0)
    return model


def test_trajectory_matching_on_a_linear_model_has_the_closed_form():
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(3, 2, generator=g)
    x = torch.randn(4, 2, generator=g, dtype=torch.float32).requires_grad_(True)
    y = torch.tensor([0, 2, 1, 2])
    lr = torch.tensor(0.5, requires_grad=True)
    net = FlatParams(_softmax_regression(w0))
    theta = unrolled_sgd(net, net.get(), x, y, steps=2, lr=lr)

    # by hand: for softmax regression, grad_W mean CE = (softmax(X W^T) - Y)^T X / n
    def step(w, xx, rate):
        p = torch.softmax(xx @ w.T, -1)
        return w - rate * (p - F.one_hot(y, 3).float()).T @ xx / len(xx)

    w_hand = step(step(w0, x, lr), x, lr)
    assert torch.allclose(theta, w_hand.reshape(-1), atol=1e-6)

    target = torch.randn(6, generator=g)
    start = w0.reshape(-1)
    loss = trajectory_match_loss(theta, target, start)
    hand = ((w_hand.reshape(-1) - target) ** 2).sum() / ((start - target) ** 2).sum()
    assert torch.allclose(loss, hand, atol=1e-6)
    # the loss reaches the synthetic data and the student learning rate, as the hand formula does
    g_x, g_lr = torch.autograd.grad(loss, [x, lr], retain_graph=True)
    h_x, h_lr = torch.autograd.grad(hand, [x, lr])
    assert torch.allclose(g_x, h_x, atol=1e-5) and torch.allclose(g_lr, h_lr, atol=1e-5)
    assert g_x.abs().sum() > 0


def test_trajectory_match_loss_bounds_and_errors():
    start, target = torch.zeros(4), torch.tensor([1.0, 2.0, 0.0, -1.0])
    assert trajectory_match_loss(start, target, start) == pytest.approx(1.0)  # did not move
    assert trajectory_match_loss(target, target, start) == pytest.approx(0.0)  # reached the target
    batched = trajectory_match_loss(torch.stack([start, target]), torch.stack([target, target]),
                                    torch.stack([start, start]))
    assert batched.shape == (2,) and torch.allclose(batched, torch.tensor([1.0, 0.0]))
    with pytest.raises(KDistillError, match="expert_epochs_per_match"):
        trajectory_match_loss(target, start, start)  # the expert did not move
    with pytest.raises(KDistillError, match="flat"):
        trajectory_match_loss(torch.zeros(3), torch.zeros(4), torch.zeros(4))


def test_flat_experts_take_sharpness_aware_steps():
    """One SAM step of the expert equals the hand formula: the gradient taken at w + rho * g / ||g||."""
    g = torch.Generator().manual_seed(2)
    w0, x, y = torch.randn(3, 2, generator=g), torch.randn(5, 2, generator=g), torch.tensor([0, 1, 2, 1, 0])
    rho, lr = 0.3, 0.1

    def grad(w):
        p = torch.softmax(x @ w.T, -1)
        return (p - F.one_hot(y, 3).float()).T @ x / len(x)

    g0 = grad(w0)
    w1 = w0 - lr * grad(w0 + rho * g0 / g0.norm())
    net = FlatParams(_softmax_regression(w0))
    traj = train_expert(net, x, y, epochs=1, lr=lr, batch_size=5, generator=torch.Generator().manual_seed(0),
                        sam_rho=rho)
    assert traj.shape == (2, 6)
    assert torch.allclose(traj[0], w0.reshape(-1)) and torch.allclose(traj[1], w1.reshape(-1), atol=1e-6)
    plain = train_expert(FlatParams(_softmax_regression(w0)), x, y, epochs=1, lr=lr, batch_size=5,
                         generator=torch.Generator().manual_seed(0))
    assert torch.allclose(plain[1], (w0 - lr * g0).reshape(-1), atol=1e-6)


# ---------------------------------------------------------------------------------------------- other losses


def test_bn_statistics_distance_hand_values_per_group():
    feats = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 2.0], [3.0, 2.0]])
    out = bn_statistics_distance(feats, torch.zeros(2), torch.ones(2), groups=2)
    # group 0: mean (2, 0), variance (1, 0) -> 2 + 1; group 1: mean (2, 2), variance (1, 0) -> sqrt(8) + 1
    assert torch.allclose(out, torch.tensor([3.0, math.sqrt(8.0) + 1.0]), atol=1e-6)
    with pytest.raises(KDistillError, match="divisor"):
        bn_statistics_distance(feats, torch.zeros(2), torch.ones(2), groups=3)


def test_teacher_scores_hand_values():
    logits = torch.log(torch.tensor([[0.5, 0.5, 1e-12], [0.7, 0.2, 0.1]]))
    labels = torch.tensor([0, 1])
    assert torch.allclose(el2n(logits, labels), torch.tensor([math.sqrt(0.5), math.sqrt(0.49 + 0.64 + 0.01)]),
                          atol=1e-5)
    assert torch.allclose(prediction_margin(logits, labels), torch.tensor([0.0, -0.5]), atol=1e-5)
    with pytest.raises(KDistillError, match="class ids"):
        el2n(logits, torch.tensor([0, 3]))


def test_kernel_ridge_predictions_closed_form():
    g = torch.Generator().manual_seed(3)
    fs, fq, ys = torch.randn(4, 6, generator=g), torch.randn(3, 6, generator=g), torch.randn(4, 2, generator=g)
    k_ss = fs @ fs.T
    lam = 0.1 * k_ss.diagonal().mean()
    hand = fq @ fs.T @ torch.linalg.solve(k_ss + lam * torch.eye(4), ys)
    assert torch.allclose(kernel_ridge_predictions(fq, fs, ys, ridge=0.1), hand, atol=1e-5)
    # a tiny ridge interpolates the support set (4 points in 6 dimensions)
    assert torch.allclose(kernel_ridge_predictions(fs, fs, ys, ridge=1e-7), ys, atol=1e-3)


# ---------------------------------------------------------------------------------------------- selection


def test_dq_bins_hand_case_and_cover_the_data():
    feats = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    # bin 1 starts at the most representative point (2: smallest distance sum), then adds the point closest to the
    # rest of the pool and farthest from the bin (1); bin 2 takes what is left
    bins = dq_bins(feats, 2)
    assert [b.tolist() for b in bins] == [[2, 1], [0, 3]]

    x = torch.randn(37, 5, generator=torch.Generator().manual_seed(4))
    bins = dq_bins(x, 5)
    everything = torch.cat(bins)
    assert sorted(everything.tolist()) == list(range(37))  # disjoint and covering
    assert [len(b) for b in bins] == [8, 8, 7, 7, 7]
    with pytest.raises(KDistillError, match="num_bins"):
        dq_bins(x, 38)


def test_sampling_across_bins_respects_the_budget():
    bins = [torch.arange(0, 10), torch.arange(10, 12), torch.arange(12, 30)]
    for budget in (1, 3, 7, 13, 30):
        picked = sample_across_bins(bins, budget, generator=torch.Generator().manual_seed(budget))
        assert len(picked) == budget == len(set(picked.tolist()))
        per_bin = [int(((picked >= b[0]) & (picked <= b[-1])).sum()) for b in bins]
        assert all(n <= len(b) for n, b in zip(per_bin, bins))
        if budget <= 6:  # an even spread while every bin has room
            assert max(per_bin) - min(per_bin) <= 1
    assert sample_across_bins(bins, 7, generator=torch.Generator().manual_seed(0)).tolist() == \
        sorted(sample_across_bins(bins, 7, generator=torch.Generator().manual_seed(0)).tolist())
    with pytest.raises(KDistillError, match="budget"):
        sample_across_bins(bins, 31, generator=torch.Generator())


def test_select_by_score_keeps_the_fraction_in_the_right_direction():
    hardness = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2])
    assert select_by_score(hardness, keep="hard", fraction=0.5).tolist() == [0, 2, 4]
    assert select_by_score(hardness, keep="easy", fraction=0.5).tolist() == [1, 3, 5]
    assert select_by_score(hardness, keep="hard", fraction=0.01).tolist() == [2]  # at least one
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    assert select_by_score(hardness, labels, keep="hard", per_class=1, num_classes=2).tolist() == [2, 4]
    assert select_by_score(hardness, labels, keep="easy", per_class=2, num_classes=2).tolist() == [0, 1, 3, 5]
    with pytest.raises(KDistillError, match="exactly one budget"):
        select_by_score(hardness, keep="hard")
    with pytest.raises(KDistillError, match="class 0 has only 3"):
        select_by_score(hardness, labels, keep="hard", per_class=4, num_classes=2)


class _TableTeacher(nn.Module):
    """Returns fixed logits for the inputs, which hold their own row number."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(logits.clone(), requires_grad=False)

    def forward(self, x):
        return self.table[x[:, 0].long()]


def test_kd_pruning_keeps_easy_examples_with_the_teachers_soft_labels():
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    inputs = torch.arange(6.0)[:, None].repeat(1, 3)
    confident = torch.tensor([[4.0, 0.0], [1.0, 0.0], [0.2, 0.0], [0.0, 0.5], [0.0, 6.0], [0.0, 2.0]])
    method = METHODS.get("kd_pruning")(score="el2n", keep="easy", kd_temperature=2.0)
    ds = method.distill_data(inputs=inputs, labels=labels, num_classes=2, per_class=2,
                             teacher=_TableTeacher(confident), build_model=lambda: nn.Linear(3, 2), seed=0)
    assert ds.tensors["source_indices"].tolist() == [0, 1, 4, 5]  # the two most confident of each class
    assert torch.allclose(ds.soft_labels, torch.softmax(confident[[0, 1, 4, 5]] / 2.0, -1))
    hard = METHODS.get("kd_pruning")(keep="hard").distill_data(
        inputs=inputs, labels=labels, num_classes=2, per_class=1, teacher=_TableTeacher(confident),
        build_model=lambda: nn.Linear(3, 2), seed=0)
    assert hard.tensors["source_indices"].tolist() == [2, 3]
    with pytest.raises(KDistillError, match="needs a teacher"):
        method.distill_data(inputs=inputs, labels=labels, num_classes=2, per_class=1, teacher=None,
                            build_model=lambda: nn.Linear(3, 2), seed=0)


def test_per_class_random_draws_the_budget_from_every_class():
    labels = torch.tensor([0, 1, 2] * 5)
    idx = per_class_random(labels, 3, 4, generator=torch.Generator().manual_seed(0))
    assert len(set(idx.tolist())) == 12 and torch.bincount(labels[idx]).tolist() == [4, 4, 4]


def test_infer_adds_one_compensator_per_group_of_one_example_per_class():
    g = torch.Generator().manual_seed(5)
    labels = torch.arange(3).repeat(8)
    inputs = torch.randn(24, 6, generator=g)
    teacher = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    ds = METHODS.get("infer")(iterations=3, jitter=0).distill_data(
        inputs=inputs, labels=labels, num_classes=3, per_class=2, teacher=teacher, build_model=lambda: None, seed=0)
    n = ds.meta["natural_per_class"]  # floor(2 / (1 / 3 + 1)) = 1
    assert n == 1 and len(ds) == 2 * 3 * n and ds.tensors["compensators"].shape == (n, 6)
    natural = inputs[ds.tensors["natural_indices"]]
    assert torch.equal(ds.inputs[:3], natural)
    assert torch.allclose(ds.inputs[3:], natural + ds.tensors["compensators"][0])
    assert ds.tensors["compensators"].abs().sum() > 0  # it learned something
    assert not teacher.training and all(p.requires_grad for p in teacher.parameters())  # left as it was


# ---------------------------------------------------------------------------------------------- the file


def test_distilled_set_file_round_trip(tmp_path):
    g = torch.Generator().manual_seed(6)
    ds = DistilledSet(inputs=torch.randn(6, 1, 4, 4, generator=g), labels=torch.tensor([0, 1, 2, 0, 1, 2]),
                      soft_labels=torch.softmax(torch.randn(6, 3, generator=g), -1),
                      per_example={"targets": torch.randn(6, 5, generator=g)},
                      tensors={"source_indices": torch.tensor([9, 3, 4, 1, 0, 7]), "compensators": torch.ones(2, 16)},
                      meta={"method": {"name": "kd_pruning"}, "per_class": 2, "class_names": ["a", "b", "c"]})
    path = save_distilled_set(tmp_path / "set.safetensors", ds)
    back = load_distilled_set(path)
    assert torch.equal(back.inputs, ds.inputs) and torch.equal(back.labels, ds.labels)
    assert torch.equal(back.soft_labels, ds.soft_labels)
    assert back.per_example.keys() == ds.per_example.keys() and torch.equal(back.per_example["targets"],
                                                                            ds.per_example["targets"])
    assert all(torch.equal(back.tensors[k], v) for k, v in ds.tensors.items()) and back.tensors.keys() == \
        ds.tensors.keys()
    assert back.meta == ds.meta

    from safetensors.torch import save_file

    save_file({"weight": torch.ones(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(KDistillError, match="not a distilled data set"):
        load_distilled_set(tmp_path / "weights.safetensors")
    with pytest.raises(KDistillError, match="does not exist"):
        load_distilled_set(tmp_path / "missing.safetensors")
    with pytest.raises(KDistillError, match=r"\.safetensors"):
        save_distilled_set(tmp_path / "set.pt", ds)
    with pytest.raises(KDistillError, match="one per input"):
        DistilledSet(inputs=torch.zeros(3, 2), labels=torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------------------------------------- the task


def test_tiny_recipe_writes_the_sets_the_grids_and_the_report(tmp_path):
    report = run("dataset_distillation/tiny", output=tmp_path / "dd", progress=False, quiet=True)
    out = tmp_path / "dd"
    assert report["task"] == "dataset_distillation" and report["method"] == "gradient_matching"
    assert [(r["per_class"], r["student"]) for r in report["results"]] == [(1, "mlp"), (1, "cnn"), (2, "mlp"),
                                                                           (2, "cnn")]
    for r in report["results"]:
        assert 0.0 <= r["distilled"]["accuracy"] <= 1.0 and 0.0 <= r["random"]["accuracy"] <= 1.0
    assert set(report["full_data"]) == {"mlp", "cnn"}
    assert report["baseline"]["metrics"] == report["results"][0]["random"]
    for k in (1, 2):
        ds = load_distilled_set(out / f"per_class_{k}" / "distilled.safetensors")
        assert len(ds) == 10 * k and torch.bincount(ds.labels).tolist() == [k] * 10
        assert ds.meta["per_class"] == k and ds.meta["data"]["name"] == "mnist1d"
        assert (out / f"per_class_{k}" / "grid.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "Distilled set vs random real subset vs full data" in md
    assert json.loads((out / "report.json").read_text())["results"] == report["results"]

    # any training can load the set: the classification task trains on it as `data: {name: distilled}`
    cls = run({"name": "from_distilled", "task": "classification", "seed": 0,
               "data": {"name": "distilled", "kwargs": {"path": str(out / "per_class_2" / "distilled.safetensors")}},
               "teacher": {"model": {"name": "mlp", "kwargs": {"width": 8, "depth": 1}},
                           "train": {"epochs": 2, "batch_size": 16, "lr": 0.01}},
               "student": {"name": "mlp", "kwargs": {"width": 8, "depth": 1}},
               "train": {"epochs": 2, "batch_size": 16, "lr": 0.01}, "eval": {"latency_repeats": 1}},
              output=tmp_path / "cls", progress=False, quiet=True)
    assert cls["data"]["train"] == 20 and cls["data"]["test"] == 400  # train: the set; test: MNIST-1D's


def test_clear_errors_for_bad_recipes(tmp_path):
    base = load_config("dataset_distillation/tiny").model_dump()
    with pytest.raises(ConfigError, match="builds no data set") as err:
        load_config({**base, "method": {"name": "hinton_kd"}})
    assert "gradient_matching" in str(err.value)  # the methods that do are listed
    with pytest.raises(ConfigError, match="distinct budgets"):
        load_config({**base, "per_class": [0, 1]})
    with pytest.raises(ConfigError, match="Did you mean 'iterations'"):
        load_config({**base, "method": {"name": "gradient_matching", "kwargs": {"iteration": 3}}})
    with pytest.raises(ConfigError, match="at least one student"):
        load_config({**base, "students": {}})
    classification = {"task": "classification", "data": {"name": "mnist1d"}, "student": {"name": "mlp"},
                      "teacher": {"model": {"name": "mlp"}}}
    with pytest.raises(ConfigError, match="missing required argument"):
        load_config({**classification, "data": {"name": "distilled"}})
    with pytest.raises(ConfigError, match="task: dataset_distillation"):  # never silently a label-only student
        load_config({**classification, "method": {"name": "kd_pruning"}})
    with pytest.raises(KDistillError, match="class 0 has only"):
        run({**base, "per_class": [500]}, output=tmp_path / "big", progress=False, quiet=True)
    assert not (tmp_path / "big" / "teacher").exists()  # refused before any training


SMALL = {
    "dataset_quantization": {"num_bins": 3},
    "trajectory_matching": {"iterations": 2, "syn_steps": 2, "num_experts": 1, "expert_epochs": 3,
                            "max_start_epoch": 1, "expert_epochs_per_match": 1, "expert_batch_size": 32},
    "flat_trajectory_matching": {"iterations": 2, "syn_steps": 2, "num_experts": 1, "expert_epochs": 3,
                                 "max_start_epoch": 1, "expert_epochs_per_match": 1, "expert_batch_size": 32},
    "self_supervised_distillation": {"iterations": 2, "batch_real": 32, "pool_size": 1},
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_each_method_builds_a_balanced_set_from_its_recipe(name):
    """The recipe of each method validates and names it; a few of its iterations on 3 separable classes give
    ``per_class`` finite examples of every class, shaped like the inputs."""
    from kdistill.registry import MODELS

    cfg = load_config(f"dataset_distillation/{name}")
    assert cfg.method.name == name and METHODS.get(name).distills_data
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat(20)
    inputs = torch.randn(60, 1, 40, generator=g) + labels[:, None, None].float()
    teacher = MODELS.get("mlp")(input_shape=(1, 40), num_classes=3, width=16, depth=1).eval()
    ds = METHODS.get(name)(**SMALL[name]).distill_data(
        inputs=inputs, labels=labels, num_classes=3, per_class=2, teacher=teacher, seed=0,
        build_model=lambda: MODELS.get("mlp")(input_shape=(1, 40), num_classes=3, width=16, depth=1))
    assert ds.inputs.shape[1:] == inputs.shape[1:] and torch.isfinite(ds.inputs).all()
    assert torch.bincount(ds.labels.long(), minlength=3).tolist() == [2, 2, 2]
