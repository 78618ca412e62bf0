import numpy as np
import pytest
import torch

from kdistill.data import TensorDictDataset, load_dataset, make_loader
from kdistill.data.augment import Mixup
from kdistill.errors import KDistillError


def test_mnist1d_is_local_and_deterministic():
    a = load_dataset("mnist1d", num_samples=600)
    b = load_dataset("mnist1d", num_samples=600)
    assert a.input_shape == (40,) and a.num_classes == 10
    assert len(a.y_train) + len(a.y_val) == 480 and len(a.y_test) == 120
    assert torch.equal(a.x_train, b.x_train)
    assert abs(float(a.x_train.mean())) < 0.05  # standardised with train statistics


@pytest.mark.parametrize("name,classes,features", [("digits", 10, 64), ("iris", 3, 4), ("wine", 3, 13),
                                                    ("breast_cancer", 2, 30)])
def test_sklearn_sets(name, classes, features):
    d = load_dataset(name)
    assert d.num_classes == classes and d.input_shape == (features,)
    assert set(d.y_test.tolist()) <= set(range(classes)) and len(d.y_val) > 0


@pytest.mark.resources
def test_fashion_mnist_from_debian_package():
    d = load_dataset("fashion_mnist", num_train=2000)
    assert d.input_shape == (1, 28, 28) and len(d.y_test) == 10000 and len(d.y_train) + len(d.y_val) == 2000
    assert d.class_names[0] == "t-shirt"


def test_unknown_dataset_and_bad_kwargs():
    with pytest.raises(KDistillError, match="mnist1d"):
        load_dataset("mnist_1d")
    with pytest.raises(KDistillError, match="val_fraction"):
        load_dataset("digits", val_fraction=0.9)


def test_loader_is_deterministic_per_epoch_and_batched():
    ds = TensorDictDataset(inputs=torch.arange(10).float(), labels=torch.arange(10))
    l1, l2 = make_loader(ds, 4, seed=5), make_loader(ds, 4, seed=5)
    e0 = [b["labels"].tolist() for b in l1]
    assert e0 == [b["labels"].tolist() for b in l2]
    assert sorted(sum(e0, [])) == list(range(10)) and [len(b) for b in e0] == [4, 4, 2]
    l1.sampler.set_epoch(1)
    assert [b["labels"].tolist() for b in l1] != e0


def test_mixup_targets_are_consistent_mixtures():
    x = torch.eye(6)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    out = Mixup(alpha=1.0, num_classes=3)({"inputs": x, "labels": y}, np.random.default_rng(0))
    lam = out["mix_lambda"]
    assert 0 < lam < 1
    assert torch.allclose(out["target_probs"].sum(-1), torch.ones(6))
    # each mixed input holds lam of its own one-hot row, and the target holds lam of its own label
    # x is the identity: row i of the mix is lam * e_i + (1 - lam) * e_perm(i)
    assert torch.allclose(out["inputs"].sum(-1), torch.ones(6))
    assert (out["inputs"].diagonal() >= lam - 1e-6).all()
    for i in range(6):
        assert out["target_probs"][i, y[i]] >= lam - 1e-6
    # same rng state -> same augmentation (so resumed runs draw the same mixes)
    again = Mixup(alpha=1.0, num_classes=3)({"inputs": x, "labels": y}, np.random.default_rng(0))
    assert torch.equal(again["inputs"], out["inputs"])


def test_neighbour_group_sampler_is_a_permutation_of_neighbourhoods():
    import torch

    from kdistill.data import NeighbourGroupSampler
    from kdistill.modules.quantization import teacher_neighbours

    # 10 tight clusters of 6 points each, far apart: a group of 3 must stay inside one cluster
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 8, generator=g) * 10
    x = (centres.repeat_interleave(6, 0) + 0.01 * torch.randn(60, 8, generator=g))
    cluster = torch.arange(60) // 6
    s = NeighbourGroupSampler(teacher_neighbours(x, 5), group=3, seed=1)
    order = list(s)
    assert sorted(order) == list(range(60)) and len(s) == 60  # every row exactly once
    groups = [order[i:i + 3] for i in range(0, 60, 3)]
    same = sum(len(set(cluster[grp].tolist())) == 1 for grp in groups)
    assert same >= 15  # most groups are one neighbourhood (random triples would almost never be)
    # deterministic per (seed, epoch) and different across epochs
    assert list(NeighbourGroupSampler(teacher_neighbours(x, 5), group=3, seed=1)) == order
    s.set_epoch(1)
    assert list(s) != order and sorted(s) == list(range(60))
    # group 1 is the plain epoch shuffle
    from kdistill.data import EpochSampler

    assert list(NeighbourGroupSampler(teacher_neighbours(x, 5), group=1, seed=1)) == list(EpochSampler(60, 1))


def test_neighbour_group_sampler_rejects_bad_input():
    import pytest
    import torch

    from kdistill.data import NeighbourGroupSampler, TensorDictDataset, make_loader
    from kdistill.errors import KDistillError

    with pytest.raises(KDistillError, match="neighbour group"):
        NeighbourGroupSampler(torch.zeros(4, 2, dtype=torch.long), group=0, seed=0)
    with pytest.raises(KDistillError, match="neighbours"):
        NeighbourGroupSampler(torch.zeros(4, dtype=torch.long), group=2, seed=0)
    with pytest.raises(KDistillError, match="dataset size 5"):
        make_loader(TensorDictDataset(x=torch.zeros(5)), 2,
                    sampler=NeighbourGroupSampler(torch.zeros(4, 1, dtype=torch.long), group=2, seed=0))
