"""Student design before distillation (`kdistill design`): DisWOT's matrices on hand-made features, the ranking's
determinism, a teacher copy scoring highest, FLOPs, Pareto front and capacity-gap summaries with known answers,
budgets and their errors, and a tiny end-to-end run of the command."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from kdistill import api
from kdistill.config import load_config
from kdistill.errors import ConfigError, KDistillError
from kdistill.eval.diswot import (
    DisWOTFeatures,
    class_activation,
    diswot_distances,
    diswot_features,
    score_candidates,
    semantic_matrix,
)
from kdistill.eval.metrics import model_flops
from kdistill.models.classifiers import build_cnn, build_mlp
from kdistill.students.design import (
    candidates,
    capacity_gap_summary,
    over_budget,
    pareto_front,
    parse_budget,
    rank_correlations,
)

# ---------------------------------------------------------------------------------------------- budgets


def test_parse_budget_reads_both_keys_and_suffixes():
    assert parse_budget(None) == {}
    assert parse_budget("params=50000") == {"params": 50000.0}
    assert parse_budget("params=50k") == {"params": 50000.0}
    assert parse_budget(" params=1.5M , latency_ms=0.25 ") == {"params": 1.5e6, "latency_ms": 0.25}


@pytest.mark.parametrize("text, says", [
    ("", "got ''"),
    ("params", "is not KEY=VALUE"),
    ("param=5000", "Did you mean 'params'"),
    ("latency=2", "Did you mean 'latency_ms'"),
    ("params=-3", "is not a positive number"),
    ("params=lots", "is not a positive number"),
    ("latency_ms=1k", "is not a positive number"),  # suffixes are for parameter counts only
    ("params=5,params=6", "sets 'params' twice"),
])
def test_a_bad_budget_gets_one_clear_error_with_the_fix(text, says):
    with pytest.raises(KDistillError) as e:
        parse_budget(text)
    msg = str(e.value)
    assert says in msg and f"got {text!r}" in msg
    assert "expected params=N" in msg and "Fix: e.g. --budget params=50k" in msg


def test_the_cli_refuses_a_bad_budget_before_loading_anything(tmp_path):
    from typer.testing import CliRunner

    from kdistill.cli import app

    res = CliRunner().invoke(app, ["design", "no/such/recipe", "--budget", "params:5", "-o", str(tmp_path / "d")])
    assert res.exit_code != 0
    assert "--budget: got 'params:5'" in res.output and "Fix:" in res.output  # not the missing recipe
    assert not (tmp_path / "d").exists()


def test_over_budget_names_what_is_exceeded():
    assert over_budget(params=100, latency_ms=1.0, budget={}) == []
    assert over_budget(params=100, latency_ms=1.0, budget={"params": 100, "latency_ms": 1.0}) == []
    assert over_budget(params=101, latency_ms=1.5, budget={"params": 100, "latency_ms": 1.0}) == [
        "101 params > 100", "1.500 ms > 1 ms"]


# ---------------------------------------------------------------------------------------------- search space


def test_candidates_are_every_combination_in_order():
    got = candidates({"mlp": {"width": [8, 16], "depth": [1, 2]}, "cnn": {"width": [4], "depth": [3]}})
    assert [c.name for c in got] == ["mlp_width8_depth1", "mlp_width8_depth2", "mlp_width16_depth1",
                                     "mlp_width16_depth2", "cnn_width4_depth3"]
    assert got[-1].kwargs == {"width": 4, "depth": 3}


def test_design_space_is_checked_when_the_recipe_loads():
    base = {"task": "classification", "data": {"name": "wine"}, "teacher": {"model": "mlp"}, "student": "mlp"}
    cfg = load_config({**base, "design": {"space": {"mlp": {"width": 8, "depth": [1, 2]}}}})
    assert cfg.design.space == {"mlp": {"width": [8], "depth": [1, 2]}}  # a single value is a fixed argument
    with pytest.raises(ConfigError, match="Did you mean 'mlp'"):
        load_config({**base, "design": {"space": {"mpl": {"width": [8]}}}})
    with pytest.raises(ConfigError, match="Did you mean 'width'"):
        load_config({**base, "design": {"space": {"mlp": {"widht": [8]}}}})
    with pytest.raises(ConfigError, match="design.top_k: got -1"):
        load_config({**base, "design": {"top_k": -1}})


def test_model_flops_match_the_closed_form():
    torch.manual_seed(0)
    m = build_mlp((40,), 10, width=64, depth=2)
    assert model_flops(m, torch.randn(1, 40)) == 2 * (40 * 64 + 64 * 64 + 64 * 10)
    assert model_flops(m, torch.randn(3, 40)) == 3 * 2 * (40 * 64 + 64 * 64 + 64 * 10)
    c = build_cnn((40,), 10, width=4, depth=2, kernel_size=3)  # conv 1->4 on 40 positions, 4->4 stride 2 on 20
    assert model_flops(c, torch.randn(1, 40)) == 2 * (40 * 4 * 1 * 3 + 20 * 4 * 4 * 3 + 4 * 10)


# ---------------------------------------------------------------------------------------------- DisWOT


def test_class_activation_is_relu_of_the_head_weighted_maps():
    maps = torch.tensor([[[1.0, -2.0], [0.5, 1.0]]])  # (B=1, C=2, S=2)
    w = torch.tensor([[1.0, 2.0], [-1.0, 0.0]])  # (K=2, C=2)
    g = class_activation(maps, w)
    # class 0: 1*[1, -2] + 2*[0.5, 1] = [2, 0]; class 1: -1*[1, -2] = [-1, 2] -> ReLU [0, 2]
    assert torch.equal(g, torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    assert torch.allclose(semantic_matrix(maps, w), torch.eye(2))  # two classes that never co-activate
    flat = torch.tensor([[1.0, -1.0], [2.0, 0.0]])  # (B, C) without positions: ReLU(W f_b) per example
    # class 0: W_0 . f = [-1, 2] -> [0, 2]; class 1: W_1 . f = [-1, -2] -> [0, 0]
    assert torch.equal(class_activation(flat, w), torch.tensor([[0.0, 2.0], [0.0, 0.0]]))
    with pytest.raises(KDistillError, match="same C"):
        class_activation(torch.randn(2, 3), w)


def test_distances_are_zero_for_equal_features_scale_free_and_positive_otherwise():
    torch.manual_seed(0)
    t = DisWOTFeatures(torch.randn(8, 6, 5), torch.randn(8, 6), torch.randn(4, 6))
    sem, rel = diswot_distances(t, t)
    assert float(sem) == 0.0 and float(rel) == 0.0
    scaled = DisWOTFeatures(3.0 * t.maps, 2.0 * t.embed, 5.0 * t.head_weight)
    sem, rel = diswot_distances(scaled, t)
    assert float(sem) < 1e-5 and float(rel) < 1e-5  # both matrices are row-normalised Gram matrices
    other = DisWOTFeatures(torch.randn(8, 3), torch.randn(8, 3), torch.randn(4, 3))  # another width, no positions
    sem, rel = diswot_distances(other, t)
    assert float(sem) > 0.05 and float(rel) > 0.05
    with pytest.raises(KDistillError, match="the same classes"):
        diswot_distances(DisWOTFeatures(torch.randn(8, 3), torch.randn(8, 3), torch.randn(5, 3)), t)


def test_features_come_from_before_the_pool_and_the_head_input():
    torch.manual_seed(0)
    cnn = build_cnn((40,), 10, width=4, depth=2)
    f = diswot_features(cnn, torch.randn(5, 40))
    assert f.maps.shape == (5, 4, 20) and f.embed.shape == (5, 4) and f.head_weight.shape == (10, 4)
    assert torch.allclose(f.maps.mean(-1), f.embed, atol=1e-6)  # the pooled map is what the head reads
    assert cnn.training  # the mode is restored
    mlp = build_mlp((40,), 10, width=16, depth=1)
    f = diswot_features(mlp, torch.randn(5, 40))
    assert f.maps.shape == f.embed.shape == (5, 16)
    with pytest.raises(KDistillError, match="without a linear classifier named `head`"):
        diswot_features(nn.Sequential(nn.Linear(40, 10)), torch.randn(2, 40))


def _trained_teacher() -> nn.Module:
    torch.manual_seed(0)
    x = torch.randn(256, 40)
    y = (x[:, :10].argmax(1))
    teacher = build_cnn((40,), 10, width=8, depth=3)
    opt = torch.optim.Adam(teacher.parameters(), lr=0.01)
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(teacher(x), y).backward()
        opt.step()
    return teacher.eval()


def test_a_candidate_identical_to_the_teacher_scores_highest():
    teacher = _trained_teacher()
    batches = list(torch.randn(3, 32, 40).unbind(0))
    builders = {"mlp_small": lambda: build_mlp((40,), 10, width=8, depth=1),
                "mlp_big": lambda: build_mlp((40,), 10, width=128, depth=2),
                "cnn_same_shape_untrained": lambda: build_cnn((40,), 10, width=8, depth=3),
                "teacher_copy": lambda: copy.deepcopy(teacher)}
    scores = score_candidates(builders, teacher, batches, seed=0)
    best = max(scores, key=lambda n: scores[n]["diswot"])
    assert best == "teacher_copy" and scores[best]["diswot"] == pytest.approx(0.0, abs=1e-5)
    assert all(s["diswot"] < -1e-3 for n, s in scores.items() if n != "teacher_copy")
    for s in scores.values():
        assert s["diswot"] == pytest.approx(-(s["semantic_distance"] + s["relational_distance"]))


def test_the_ranking_is_deterministic_given_the_seed():
    teacher = _trained_teacher()
    batches = list(torch.randn(2, 32, 40).unbind(0))
    builders = {f"mlp_{w}_{d}": (lambda w=w, d=d: build_mlp((40,), 10, width=w, depth=d))
                for w in (8, 32) for d in (1, 2)}
    builders["cnn_4_2"] = lambda: build_cnn((40,), 10, width=4, depth=2)
    a = score_candidates(builders, teacher, batches, seed=3)
    torch.randn(100)  # global RNG use in between changes nothing: every candidate is built right after seeding
    b = score_candidates(builders, teacher, batches, seed=3)
    c = score_candidates(builders, teacher, batches, seed=4)
    assert a == b
    assert a != c  # the seed picks the untrained weights, so it moves the scores


# ---------------------------------------------------------------------------------------------- summaries


def test_pareto_front_known_answer():
    latency = [1.0, 2.0, 2.0, 3.0, 0.5, 4.0]
    quality = [0.70, 0.80, 0.75, 0.80, 0.60, 0.90]
    # 2 is dominated by 1 (same latency, lower quality); 3 by 1 (slower, same quality)
    assert pareto_front(latency, quality) == [4, 0, 1, 5]
    assert pareto_front([1.0], [0.5]) == [0]
    with pytest.raises(KDistillError, match="one of each"):
        pareto_front([1.0, 2.0], [0.5])


def test_rank_correlations_direction():
    target = [0.1, 0.4, 0.3, 0.9]
    got = rank_correlations({"same": [1, 4, 3, 9], "reversed": [9, 3, 4, 1]}, target)
    assert got["same"] == pytest.approx(1.0) and got["reversed"] == pytest.approx(-1.0)
    assert rank_correlations({"s": [1, 2]}, [0.1, 0.2]) == {"s": None}  # too few points to rank


def test_capacity_gap_summary_finds_the_peak_and_the_law_point():
    sizes = [100, 1_000, 10_000, 100_000]
    gains = [0.01, 0.05, 0.03, -0.01]  # concave in log size, largest at 1,000
    rows = [{"name": f"s{p}", "params": p, "distilled": 0.5 + g, "alone": 0.5} for p, g in zip(sizes, gains)]
    s = capacity_gap_summary(rows, teacher_params=25_000, teacher_accuracy=0.9, law_fraction=0.4)
    assert s["best_gain"]["name"] == "s1000" and s["best_gain"]["gain"] == pytest.approx(0.05)
    assert s["best_gain"]["ratio"] == pytest.approx(0.04)
    assert s["law_params"] == pytest.approx(10_000) and s["law_nearest"]["name"] == "s10000"
    assert 100 < s["fit"]["peak_params"] < 100_000 and s["fit"]["coefficients"][0] < 0
    assert [r["gap_to_teacher"] for r in s["rows"]] == pytest.approx([0.9 - 0.5 - g for g in gains])
    rising = capacity_gap_summary([{**r, "distilled": 0.5 + i / 10} for i, r in enumerate(rows)],
                                  teacher_params=25_000, teacher_accuracy=0.9, law_fraction=0.4)
    assert rising["fit"]["peak_params"] is None  # no interior peak: the gain still grows at the largest size


# ---------------------------------------------------------------------------------------------- end to end

TINY = {"name": "tiny_design", "task": "classification", "seed": 1, "data": {"name": "wine"},
        "teacher": {"model": {"name": "mlp", "kwargs": {"width": 32}},
                    "train": {"epochs": 8, "batch_size": 16, "lr": 0.01}},
        "student": {"name": "mlp", "kwargs": {"width": 4, "depth": 1}},
        "method": {"name": "hinton_kd", "kwargs": {"kd_temperature": 2.0}},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.01}, "baseline": False, "eval": {"latency_repeats": 2},
        "design": {"space": {"mlp": {"width": [4, 16, 64], "depth": [1, 2]}, "cnn": {"width": [2], "depth": [2]}},
                   "steps": 15, "top_k": 2, "score_batches": 2, "score_batch_size": 32}}


def test_design_end_to_end_respects_the_budget_and_writes_a_loadable_recipe(tmp_path):
    out = api.design(TINY, output=tmp_path / "d", budget="params=1500", progress=False)
    d = json.loads((tmp_path / "d" / "design.json").read_text())
    assert out["candidates"] == 7 == len(d["candidates"])
    inside = [c for c in d["candidates"] if not c["excluded"]]
    outside = [c for c in d["candidates"] if c["excluded"]]
    assert inside and outside and out["within_budget"] == len(inside)
    assert all(c["params"] <= 1500 for c in inside) and all(c["params"] > 1500 for c in outside)
    assert all("diswot" not in c and "distilled" not in c for c in outside)
    # ranked by the training-free score; the top two (and only they) were distilled
    assert d["ranking"] == [c["name"] for c in sorted(inside, key=lambda c: -c["diswot"])]
    assert [c["name"] for c in inside if "distilled" in c] == d["ranking"][:2] and out["distilled"] == 2
    chosen = next(c for c in inside if c["name"] == out["chosen"])
    assert chosen["distilled"]["val_accuracy"] == max(c["distilled"]["val_accuracy"] for c in inside
                                                      if "distilled" in c)
    assert out["chosen"] in d["pareto_front"]  # the most accurate is never dominated
    assert d["rank_correlation"]["n"] == 2 and d["rank_correlation"]["diswot"] is None
    for f in ("pareto.png", "recipe.yaml"):
        assert (tmp_path / "d" / f).stat().st_size > 0
    cfg = load_config(str(tmp_path / "d" / "recipe.yaml"))  # the input recipe with the chosen student
    assert cfg.student.name == chosen["family"] and cfg.student.kwargs == chosen["kwargs"]
    assert cfg.teacher.model.kwargs == {"width": 32} and cfg.method.name == "hinton_kd"

    with pytest.raises(KDistillError, match="none of the 7 candidates.*Fix: raise --budget"):
        api.design(TINY, output=tmp_path / "none", budget="params=10", progress=False)


def test_capacity_gap_mode_distils_and_trains_alone_every_candidate(tmp_path):
    r = {**TINY, "design": {**TINY["design"], "space": {"mlp": {"width": [4, 16, 64], "depth": [1]}}}}
    out = api.design(r, output=tmp_path / "cg", capacity_gap=True, progress=False)
    d = json.loads((tmp_path / "cg" / "design.json").read_text())
    assert out["distilled"] == 3 and all("alone" in c and "distilled" in c for c in d["candidates"])
    s = d["capacity_gap"]
    assert [row["params"] for row in s["rows"]] == sorted(c["params"] for c in d["candidates"])
    for row in s["rows"]:
        c = next(c for c in d["candidates"] if c["name"] == row["name"])
        assert row["gain"] == pytest.approx(c["distilled"]["test_accuracy"] - c["alone"]["test_accuracy"])
    assert d["rank_correlation"]["n"] == 3 and d["rank_correlation"]["diswot"] is not None
    assert (tmp_path / "cg" / "capacity_gap.png").stat().st_size > 0


def test_design_refuses_a_task_without_a_student_search(tmp_path):
    with pytest.raises(KDistillError, match="has no student search; expected a recipe of one of: classification, llm"):
        api.design("diffusion/tiny", output=tmp_path / "x", progress=False)
