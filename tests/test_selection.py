"""Data selection before distillation (kdistill.data.selection): every strategy on hand-made cases with known
answers, exact budgets, `kdistill select` round trips, and the errors for bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from kdistill import api
from kdistill.config import load_config
from kdistill.data import selection as S
from kdistill.errors import ConfigError, KDistillError
from kdistill.registry import SELECTORS


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------- budgets

@pytest.mark.parametrize(("n", "fraction", "expected"), [(10, 0.25, 3), (10, 0.5, 5), (7, 0.1, 1), (200, 0.1, 20),
                                                          (3, 1.0, 3), (1000, 0.001, 1)])
def test_fraction_gives_the_budget_rounded_half_up(n, fraction, expected):
    assert S.budget_of(n, fraction=fraction) == expected
    assert S.budget_of(n, fraction=0.9, budget=2) == 2  # an explicit budget wins


def _probs(n: int, c: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.softmax(3 * torch.randn(n, c, generator=torch.Generator().manual_seed(seed)), -1)


@pytest.mark.parametrize("budget", [1, 7, 20])
def test_every_strategy_keeps_exactly_its_budget(budget):
    n = 40
    p = _probs(n)
    domains = torch.arange(n) % 3
    inputs = {
        "teacher_probs": lambda: p,
        "proxy_probs": lambda idx: (p.flip(1), p[idx]),
        "view_probs": lambda idx, v, seed: (p.expand(v, n, 4), p.flip(1).expand(v, n, 4)),
        "teacher_log_likelihood": lambda: -torch.arange(n, dtype=torch.float64),
        "reference_log_likelihood": lambda **kw: -2 * torch.arange(n, dtype=torch.float64),
        "domains": lambda: (domains, ["a", "b", "c"]),
        "example_losses": lambda model, idx: torch.ones(len(idx)) * (1.0 if model is None else 2.0),
    }
    assert set(SELECTORS.names()) == {"random", "miniplm", "ddk", "pcoreset", "rad", "kd3"}
    for name in SELECTORS.names():
        sel = S.choose_subset(name, n=n, budget=budget, seed=3, **inputs)
        assert len(sel.indices) == budget == len(sel.indices.unique()), name
        assert bool((sel.indices >= 0).all() and (sel.indices < n).all()) and sel.scores.shape == (n,)
        assert torch.equal(sel.indices, sel.indices.sort().values)
        again = S.choose_subset(name, n=n, budget=budget, seed=3, **inputs)
        assert torch.equal(sel.indices, again.indices), f"{name} is not deterministic given the seed"


# ------------------------------------------------------------------------------------------- MiniPLM

def test_miniplm_keeps_the_documents_with_the_largest_teacher_minus_reference_gap():
    teacher = torch.tensor([-1.0, -2.0, -3.0, -1.5, -4.0, -0.5], dtype=torch.float64)
    reference = torch.tensor([-1.1, -4.5, -3.2, -1.4, -4.1, -2.0], dtype=torch.float64)
    # gaps: 0.1, 2.5, 0.2, -0.1, 0.1, 1.5 -> the two largest are documents 1 and 5
    calls = {}

    def ref(*, name, train_indices, epochs):
        calls.update(name=name, train_indices=train_indices, epochs=epochs)
        return reference

    sel = S.choose_subset("miniplm", n=6, budget=2, seed=0, teacher_log_likelihood=lambda: teacher,
                          reference_log_likelihood=ref)
    assert sel.indices.tolist() == [1, 5]
    assert torch.allclose(sel.scores, teacher - reference)
    assert calls["name"] is None and len(calls["train_indices"]) == 1  # a reference trained on 10% (at least one)
    sel3 = S.choose_subset("miniplm", n=6, budget=3, seed=0, teacher_log_likelihood=lambda: teacher,
                           reference_log_likelihood=ref, options={"reference": "some-lm"})
    assert sel3.indices.tolist() == [1, 2, 5] and calls["name"] == "some-lm" and calls["train_indices"] is None


def test_teacher_log_likelihood_read_off_a_topk_cache_matches_a_teacher_pass(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdistill.data.lm import lm_tensors
    from kdistill.teachers.cache import TopKCache, write_topk_cache
    from kdistill.train.selection import cache_log_likelihood, sequence_log_likelihood

    torch.manual_seed(0)
    V = 40
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    blocks = torch.randint(0, V, (6, 12))

    def teacher_fn(ids, attn):
        return model(input_ids=ids, attention_mask=attn).logits

    direct = sequence_log_likelihood(model, lm_tensors(blocks), batch_size=4)
    common = {"teacher_fingerprint": "t", "tokenizer_hash": "h", "vocab_size": V, "dtype": "float32"}
    full = TopKCache(write_topk_cache(tmp_path / "full", teacher_fn, blocks.tolist(), k=V, kd_temperature=1.0,
                                      **common))
    assert torch.allclose(cache_log_likelihood(full), direct, atol=1e-4)  # k = V: exact
    part = TopKCache(write_topk_cache(tmp_path / "k8", teacher_fn, blocks.tolist(), k=8, kd_temperature=1.0,
                                      **common))
    approx = cache_log_likelihood(part)  # outside the top k: the residual spread evenly
    assert approx.shape == direct.shape and float((approx - direct).abs().max()) < 0.5
    hot = TopKCache(write_topk_cache(tmp_path / "t2", teacher_fn, blocks.tolist(), k=8, kd_temperature=2.0,
                                     **common))
    assert cache_log_likelihood(hot) is None  # log-probs at T = 2 are not the teacher's likelihood


# ------------------------------------------------------------------------------------- k-center / PCoreSet

def test_k_center_on_a_line_picks_the_farthest_point_each_time():
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0], [20.0]])
    picks, gaps = S.k_center_greedy(x, 4, first=0)
    assert picks.tolist() == [0, 5, 3, 2]  # 20 is farthest from 0; then 10 (10 from both); then 2 (2 from 0)
    assert gaps[1:].tolist() == [20.0, 10.0, 2.0] and math.isinf(float(gaps[0]))
    radii = [S.cover_radius(x, picks[:k]) for k in range(1, 5)]
    assert radii == [20.0, 10.0, 2.0, 1.0]  # the max min-distance shrinks with every pick
    # from given centers (an already labelled set), rows in `taken` are never picked again
    picks2, _ = S.k_center_greedy(x, 2, centers=x[[0, 5]], taken=torch.tensor([0, 5]))
    assert picks2.tolist() == [3, 2]


def test_pcoreset_covers_every_cluster_of_the_teacher_simplex():
    # 6 examples the teacher puts near class 0, 5 near class 1, 1 near class 2: a budget of 3 takes one of each
    near = lambda c, eps: torch.tensor([[0.9 if i == c else 0.05 for i in range(3)]]) + eps  # noqa: E731
    p = torch.cat([near(0, 0.001 * i) for i in range(6)] + [near(1, 0.002 * i) for i in range(5)] + [near(2, 0.0)])
    sel = S.choose_subset("pcoreset", n=len(p), budget=3, seed=0, teacher_probs=lambda: p)
    classes = p[sel.indices].argmax(1).tolist()
    assert sorted(classes) == [0, 1, 2]
    rand = S.choose_subset("random", n=len(p), budget=3, seed=0)
    assert S.cover_radius(p, sel.indices) < S.cover_radius(p, rand.indices)


# -------------------------------------------------------------------------------------------------- DDK

def test_ddk_update_moves_weight_to_the_domain_with_the_larger_gap():
    teacher = torch.tensor([2.0, 2.0, 2.0])
    student = torch.tensor([4.0, 2.2, 2.2])  # domain 0: the student is twice the teacher's loss
    w = torch.full((3,), 1 / 3, dtype=torch.float64)
    history = [w]
    for _ in range(4):
        w = S.ddk_update(w, teacher, student, smoothing=0.5)
        history.append(w)
        assert math.isclose(float(w.sum()), 1.0, abs_tol=1e-12)
        assert w[1] == pytest.approx(float(w[2]))  # equal gaps, equal weights
    assert all(b[0] > a[0] for a, b in zip(history, history[1:]))  # domain 0 gains at every update
    assert float(w.min()) >= 0.5 / 3  # the uniform share keeps every domain sampled
    assert torch.allclose(S.ddk_update(history[0], teacher, student, smoothing=0.0), history[0])
    # the factor is the softmax of the loss ratios
    assert torch.allclose(S.ddk_discrepancy(teacher, student), torch.softmax(student.double() / 2.0, 0))


def test_ddk_sampler_follows_the_weights_and_the_hook_reweights_every_n_steps():
    domains = torch.tensor([0] * 50 + [1] * 50)
    sampler = S.DomainSampler(domains, draws=400, seed=0, weights=torch.tensor([0.8, 0.2]),
                              exclude=torch.tensor([0, 50]))
    drawn = torch.tensor(list(sampler))
    assert len(drawn) == 400 and not bool(torch.isin(drawn, torch.tensor([0, 50])).any())
    share0 = float((domains[drawn] == 0).float().mean())
    assert 0.72 < share0 < 0.88
    gap = {"student": torch.tensor([1.0, 3.0])}  # the student lags on domain 1
    hook = S.DomainReweighter(sampler, teacher_losses=torch.tensor([1.0, 1.0]),
                              student_losses=lambda model: gap[model], every=2, smoothing=1.0)
    before = sampler.weights.clone()
    hook(1, "student")
    assert torch.equal(sampler.weights, before)  # not a multiple of `every`
    hook(2, "student")
    expected = S.ddk_update(before, torch.tensor([1.0, 1.0]), gap["student"], smoothing=1.0)
    assert torch.allclose(sampler.weights, expected) and float(expected[1]) > float(before[1])
    assert [h["step"] for h in hook.history] == [0, 2]
    share1 = float((domains[torch.tensor(list(sampler))] == 1).float().mean())
    assert abs(share1 - float(expected[1])) < 0.07  # the draws follow the new weights
    # a domain with no example in the pool (weights name 3 domains, the pool holds 2) is never drawn
    three = S.DomainSampler(domains, draws=50, seed=1, weights=torch.tensor([0.3, 0.3, 0.4]))
    assert float(three.weights[2]) == 0.0 and len(list(three)) == 50


def test_ddk_sampler_replays_its_weight_changes_for_a_resumed_epoch():
    domains = torch.tensor([0] * 40 + [1] * 40 + [2] * 40)
    live = S.DomainSampler(domains, draws=60, seed=3)
    it, seen = iter(live), []
    for i in range(60):
        if i in (10, 25):  # weights change mid-epoch, as DDK's hook does between steps
            live.weights = torch.tensor([0.7, 0.2, 0.1]) if i == 10 else torch.tensor([0.1, 0.1, 0.8])
        seen.append(next(it))
        if i == 29:
            saved = json.loads(json.dumps(live.state_dict()))  # what a checkpoint after 30 draws holds
    # a fresh sampler restored from the checkpoint re-draws the first 30 (the resumed loop skips them) and goes on
    # exactly as the interrupted one did, with the weights in force at each draw
    resumed = S.DomainSampler(domains, draws=60, seed=3)
    resumed.load_state_dict(saved)
    assert list(resumed) == seen
    assert torch.allclose(resumed.weights, torch.tensor([0.1, 0.1, 0.8], dtype=torch.float64))
    # without the replay (only the final weights restored) the first 30 draws would differ
    plain = S.DomainSampler(domains, draws=60, seed=3, weights=torch.tensor([0.1, 0.1, 0.8]))
    assert list(plain)[:30] != seen[:30]


def test_fit_resumes_a_ddk_run_to_the_uninterrupted_weights_and_history(tmp_path):
    from kdistill.data import TensorDictDataset, make_loader
    from kdistill.methods.hinton_kd import HintonKD
    from kdistill.models import build_mlp
    from kdistill.train import fit, make_accelerator

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, 6, generator=g), torch.randint(0, 3, (120,), generator=g)
    domains = torch.arange(120) % 3
    torch.manual_seed(1)
    teacher = build_mlp((6,), 3, width=16, depth=1)

    class Crash(Exception):
        pass

    def run(out, crash_at=None, resume=False):
        sampler = S.DomainSampler(domains, draws=48, seed=0)
        hook = S.DomainReweighter(sampler, teacher_losses=torch.tensor([0.02, 1.0, 30.0]), every=2, smoothing=1.0,
                                  student_losses=lambda m: torch.stack([
                                      torch.nn.functional.cross_entropy(m(x[domains == d]), y[domains == d]).detach()
                                      for d in range(3)]))

        class Hook:  # the reweighter, and a crash after optimizer step `crash_at`
            state_dict, load_state_dict = hook.state_dict, hook.load_state_dict

            def __call__(self, step, student):
                hook(step, student)
                if step == crash_at:
                    raise Crash

        torch.manual_seed(2)
        student = build_mlp((6,), 3, width=8, depth=1)
        try:
            res = fit(student=student, method=HintonKD(), teacher=teacher, accelerator=make_accelerator(),
                      train_loader=make_loader(TensorDictDataset(inputs=x, labels=y), 8, sampler=sampler),
                      epochs=2, lr=0.05, progress=False, output_dir=out, checkpoint_every=4, resume=resume,
                      on_step=Hook(), seed=0)
        except Crash:
            return None, None
        return res.student.state_dict(), hook.history

    full, history = run(tmp_path / "full")
    assert run(tmp_path / "part", crash_at=5) == (None, None)  # checkpoint at step 4, mid-epoch (6 steps per epoch)
    resumed, resumed_history = run(tmp_path / "part", resume=True)
    assert [h["step"] for h in resumed_history] == [h["step"] for h in history] == [0, 2, 4, 6, 8, 10, 12]
    assert all(torch.allclose(torch.tensor(a["weights"]), torch.tensor(b["weights"]))
               for a, b in zip(resumed_history, history))
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_ddk_static_choice_draws_more_from_the_lagging_domain():
    domains = torch.tensor([0] * 30 + [1] * 30)
    lagging = torch.tensor([1.0] * 30 + [3.0] * 30)  # per-example losses of the initial student

    def losses(model, idx):
        return torch.ones(len(idx)) if model is None else lagging[idx]

    sel = S.choose_subset("ddk", n=60, budget=20, seed=0, domains=lambda: (domains, ["a", "b"]),
                          example_losses=losses, options={"heldout_per_domain": 2})
    counts = torch.bincount(domains[sel.indices], minlength=2).tolist()
    assert counts[1] > counts[0] and sum(counts) == 20
    assert sel.info["heldout"] == 4 and sel.schedule is not None
    held = torch.nonzero(torch.isnan(sel.scores)).squeeze(1)
    assert len(held) == 4 and not bool(torch.isin(sel.indices, held).any())  # held-out rows are never trained on
    sampler, hook = sel.schedule(losses)  # during training: draws only from the chosen rows, by domain weights
    drawn = torch.tensor(list(sampler))
    assert len(drawn) == 20 and bool(torch.isin(drawn, sel.indices).all())
    hook(hook.every, "student")
    assert len(hook.history) == 2 and float(sampler.weights[1]) > float(sampler.weights[0])


def test_block_domains_match_the_packing_of_the_training_blocks():
    from kdistill.data.lm import pack_blocks

    texts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11], [12]]
    blocks = pack_blocks(texts, 4, eos_id=0, max_blocks=None)
    doms = S.block_domains(texts, [0, 1, 2, 3], block_length=4, eos_id=0, max_blocks=None, num_domains=4)
    assert len(doms) == len(blocks) == 4
    # 1 2 3 <eos> (text 0) | 4 5 <eos> 6 (text 1 holds 3) | 7 8 9 10 (text 2) | 11 <eos> 12 <eos> (a tie: lower id)
    assert doms.tolist() == [0, 1, 2, 2]


def test_domains_absent_from_the_pool_are_dropped_and_the_rest_renumbered_in_order():
    ids, names = S.drop_empty_domains(torch.tensor([3, 1, 3, 3, 1]), ["Acts", "Exo", "Gal", "Ge"])
    assert names == ["Exo", "Ge"] and ids.tolist() == [1, 0, 1, 1, 0]
    ids, names = S.drop_empty_domains(torch.tensor([0, 1]), ["a", "b"])  # nothing to drop
    assert names == ["a", "b"] and ids.tolist() == [0, 1]


# -------------------------------------------------------------------------------------------------- RAD

def test_rad_without_teacher_mistakes_is_margin_sampling():
    gains = torch.tensor([0.1, 0.9, 0.5, 0.95, 0.2, 0.7], dtype=torch.float64)
    p = S.rad_inclusion(gains, 3, mistakes=0)
    assert p.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]  # the three most informative


def test_rad_spreads_queries_against_teacher_mistakes_and_beats_margin_sampling_in_the_game():
    gains = torch.tensor([0.95, 0.9, 0.85, 0.8, 0.6, 0.5, 0.4, 0.1, 0.05, 0.0], dtype=torch.float64)
    budget, mistakes = 4, 2
    p = S.rad_inclusion(gains, budget, mistakes=mistakes)
    assert float(p.sum()) == pytest.approx(budget) and bool(((p >= 0) & (p <= 1 + 1e-12)).all())
    assert float(p[-3:].sum()) == 0.0  # uninformative examples are never queried

    def game(q):  # expected informative gain minus what the adversary's mistakes destroy
        v = q * gains
        return float(v.sum() - v.topk(mistakes).values.sum())

    greedy = S.rad_inclusion(gains, budget, mistakes=0)
    assert game(p) > game(greedy) + 1e-6
    assert int((p > 0).sum()) > budget  # the budget is spread over more informative examples


def test_rad_selector_respects_the_query_budget_and_prefers_low_margins():
    n = 200
    p = _probs(n, c=5, seed=1)
    queried = []

    def proxy(idx):
        queried.append(len(idx))
        return p, p[idx]

    for budget in (10, 37):
        sel = S.choose_subset("rad", n=n, budget=budget, seed=0, proxy_probs=proxy)
        assert len(sel.indices) == budget and queried[-1] == sel.info["seed"] == round(0.2 * budget)
        assert sel.info["mean_gain_chosen"] > sel.info["mean_gain_pool"]
    freq = torch.zeros(n)
    probs = S.rad_inclusion(1 - S.margins(p), 30, mistakes=5)
    for seed in range(300):  # systematic sampling includes each example with its probability
        drawn = S.systematic_sample(probs, seed=seed)
        assert len(drawn) == 30 == len(drawn.unique())
        freq[drawn] += 1
    assert torch.allclose(freq / 300, probs.float(), atol=0.09)


def test_rad_queries_a_black_box_teacher_only_for_the_seed():
    from kdistill.teachers.api import TeacherReply
    from kdistill.train.selection import text_inputs

    class Teacher:  # answers by keyword, counts what it is asked
        requests = 0

        def run(self, reqs):
            Teacher.requests += len(reqs)
            out = []
            for r in reqs:
                text = r["messages"][0]["content"].split("Text: ", 1)[1]
                out.append(TeacherReply("ok", text="animal" if "fur" in text else "plant"))
            return out

    texts = [f"a thing with {'fur' if i % 2 else 'leaves'} number {i} and {'claws' if i % 2 else 'roots'}"
             for i in range(60)]
    inputs = text_inputs(texts=texts, class_names=["animal", "plant"], teacher=Teacher(),
                         student_kwargs={"epochs": 3, "max_features": 50}, seed=0)
    sel = S.choose_subset("rad", n=60, budget=15, seed=0, **inputs)
    assert len(sel.indices) == 15 and Teacher.requests == sel.info["seed"] == 3


# -------------------------------------------------------------------------------------------------- KD3

def test_kd3_prefers_disagreement_or_confidence_on_augmented_views():
    t = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.9, 0.1], [0.99, 0.01], [0.6, 0.4]])
    s = torch.tensor([[0.1, 0.9], [0.5, 0.5], [0.85, 0.15], [0.99, 0.01], [0.4, 0.6]])
    views = lambda idx, v, seed: (t.expand(v, 5, 2), s.expand(v, 5, 2))  # noqa: E731
    dis = S.choose_subset("kd3", n=5, budget=2, seed=0, view_probs=views, options={"seed_fraction": 0.5})
    seed_row = set(dis.indices.tolist()) - {0}
    assert 0 in dis.indices.tolist() or len(seed_row) == 2  # row 0: the strongest disagreement
    ranked = torch.argsort(dis.scores, descending=True).tolist()
    assert ranked[0] == 0 and dis.scores[1] == 0.0 and dis.scores[3] == 0.0
    conf = S.choose_subset("kd3", n=5, budget=2, seed=0, view_probs=views,
                           options={"prefer": "confident", "seed_fraction": 0.5})
    assert int(torch.argmax(conf.scores)) == 3  # both models sure of the same class


# -------------------------------------------------------------------------------------- errors

def test_clear_errors_for_unknown_method_bad_fraction_and_unknown_option():
    base = {"name": "t", "task": "classification", "data": {"name": "wine"}, "teacher": {"model": "mlp"},
            "student": "mlp"}
    with pytest.raises(ConfigError, match="Did you mean 'pcoreset'"):
        load_config({**base, "data": {"name": "wine", "selection": {"method": "pcorset"}}})
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"fraction: got .*expected a number in \(0, 1\]"):
            load_config({**base, "data": {"name": "wine", "selection": {"method": "random", "fraction": bad}}})
    with pytest.raises(ConfigError, match="Did you mean 'smoothing'"):
        load_config({**base, "data": {"name": "wine", "selection": {"method": "ddk", "smoothin": 0.3}}})
    with pytest.raises(ConfigError, match="both fraction and budget"):
        load_config({**base, "data": {"name": "wine", "selection": {"fraction": 0.2, "budget": 5}}})
    with pytest.raises(KDistillError, match=r"budget: got 50, expected an integer in \[1, 10\]"):
        S.budget_of(10, budget=50)


def test_a_strategy_the_task_cannot_feed_says_which_ones_it_can():
    with pytest.raises(KDistillError, match=r"needs teacher_log_likelihood.*Fix: use one of .*pcoreset.*random"):
        S.choose_subset("miniplm", n=10, budget=2, seed=0, teacher_probs=lambda: _probs(10),
                        proxy_probs=lambda idx: (_probs(10), _probs(10)[idx]))


def test_missing_domain_column_and_corpus_without_domains(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"text number {i}", "topic": "a"}) for i in range(20)))
    with pytest.raises(KDistillError, match=r"column 'topik' is not in the data\. Did you mean 'topic'"):
        S.corpus_item_domains(name="files", items=["x"] * 19, domain_column="topik", files=str(f), eval_fraction=0.05)
    assert S.corpus_item_domains(name="files", items=["x"] * 19, domain_column="topic", files=str(f),
                                 eval_fraction=0.05) == ["a"] * 19
    with pytest.raises(KDistillError, match="expected data.selection.domain_column"):
        S.corpus_item_domains(name="texts", items=["a", "b"])
    with pytest.raises(KDistillError, match="expected your own files"):
        S.corpus_item_domains(name="kjv", items=["a"], domain_column="book")


# ------------------------------------------------------------------------------- kdistill select, reuse

CLS = {"name": "sel", "task": "classification", "seed": 1, "data": {"name": "wine"},
       "teacher": {"model": {"name": "mlp", "kwargs": {"width": 32}},
                   "train": {"epochs": 8, "batch_size": 16, "lr": 0.01}},
       "student": {"name": "mlp", "kwargs": {"width": 4, "depth": 1}},
       "method": {"name": "hinton_kd", "kwargs": {"kd_temperature": 2.0}},
       "train": {"epochs": 2, "batch_size": 16, "lr": 0.01}, "baseline": False, "eval": {"latency_repeats": 1}}


def test_kdistill_select_writes_a_subset_the_recipe_reads_back_identically(tmp_path, monkeypatch):
    from kdistill.cli import app

    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "r.json"  # YAML is a superset of JSON
    recipe.write_text(json.dumps(CLS))
    res = CliRunner().invoke(app, ["select", str(recipe), "--output", str(tmp_path / "sel"), "--no-progress"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    # without data.selection: the task's default, PCoreSet at 50%
    assert out["method"] == "pcoreset" and out["budget"] == S.budget_of(out["pool"], fraction=0.5)
    rows = [json.loads(ln) for ln in (tmp_path / "sel" / "subset.jsonl").read_text().splitlines()]
    kept = [r["index"] for r in rows if r["selected"]]
    assert len(rows) == out["pool"] and len(kept) == out["budget"] and all("text" in r for r in rows if r["selected"])
    run = api.run({**CLS, "data": {"name": "wine", "selection": {"subset": str(tmp_path / "sel")}}},
                  output=tmp_path / "run", progress=False, quiet=True)
    assert run["selection"]["indices_sha256"] == out["indices_sha256"] and run["selection"]["source"].startswith(
        "subset")
    assert run["data"]["train"] == out["budget"]
    assert run["teacher"]["source"].startswith("reused")  # the teacher does not depend on the selection
    back = S.read_subset(tmp_path / "sel", n=out["pool"], pool=json.loads((tmp_path / "sel" / "selection.json")
                                                                          .read_text())["pool_fingerprint"])
    assert back.indices.tolist() == kept and back.method == "pcoreset"
    with pytest.raises(KDistillError, match="chosen from another training pool"):  # refused on another pool
        S.read_subset(tmp_path / "sel", n=out["pool"], pool="0123456789abcdef")


def test_llm_select_and_ddk_run_on_your_own_files(tmp_path):
    import yaml

    from kdistill.recipes import find_recipe

    r = yaml.safe_load(find_recipe("llm/tiny").read_text())
    texts = r["data"]["texts"]
    f = tmp_path / "rows.jsonl"
    f.write_text("\n".join(json.dumps({"text": t, "topic": "light" if "light" in t else "rest"}) for t in texts * 2))
    r["data"] = {"files": str(f), "text_column": "text", "block_length": 32, "train_tokens": 1024,
                 "eval_tokens": 128, "eval_fraction": 0.15}
    r["eval"]["audit"] = {"enabled": False}
    r["baseline"] = False
    r["train"]["max_steps"] = 2
    out = api.select(r, output=tmp_path / "sel", progress=False, overrides=["data.selection.method=miniplm",
                                                                         "data.selection.reference_epochs=1"])
    assert out["method"] == "miniplm" and out["budget"] == S.budget_of(out["pool"], fraction=0.5)
    rows = [json.loads(ln) for ln in (tmp_path / "sel" / "subset.jsonl").read_text().splitlines()]
    kept = sorted((r["score"] for r in rows if r["selected"]), reverse=True)
    dropped = [r["score"] for r in rows if not r["selected"]]
    assert min(kept) >= max(dropped)  # the written scores explain the choice: the top gaps were kept
    back = api.run({**r, "data": {**r["data"], "selection": {"subset": str(tmp_path / "sel")}}},
                   output=tmp_path / "run", progress=False, quiet=True)
    assert back["selection"]["indices_sha256"] == out["indices_sha256"]
    ddk = api.run({**r, "data": {**r["data"], "selection": {"method": "ddk", "domain_column": "topic", "every": 1,
                                                            "heldout_per_domain": 1}}},
                  output=tmp_path / "ddk", progress=False, quiet=True)
    sel = ddk["selection"]
    assert sel["dynamic"] and sel["domains"] == ["light", "rest"]
    assert [h["step"] for h in sel["student_reweighting"]] == [0, 1, 2]  # the loop's on_step hook ran every step


def _domain_table(path, n=240, seed=0):
    """Two features, two classes, three domains: in ``easy`` the class is the sign of x0; in ``noisy`` half of
    the labels are flipped; ``tiny`` has 4 rows. x1 carries the domain index, so rows can be matched to domains."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        dom = "tiny" if i < 4 else ("easy" if i % 2 else "noisy")
        x0 = float(torch.randn(1, generator=g))
        y = int(x0 > 0)
        if dom == "noisy" and float(torch.rand(1, generator=g)) < 0.5:
            y = 1 - y
        rows.append({"x0": x0, "x1": {"easy": 0.0, "noisy": 1.0, "tiny": 2.0}[dom], "source": dom,
                     "label": ["neg", "pos"][y]})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return rows


def test_a_files_domain_column_is_carried_per_training_row_and_never_a_feature(tmp_path):
    from kdistill.data.classification import table_files

    _domain_table(tmp_path / "t.jsonl")
    d = table_files(files=str(tmp_path / "t.jsonl"), domain_column="source", standardise=False)
    assert d.x_train.shape[1] == 2 and len(d.train_domains) == len(d.y_train)  # x0, x1; not the domain
    code = {"easy": 0.0, "noisy": 1.0, "tiny": 2.0}
    assert [code[s] for s in d.train_domains] == d.x_train[:, 1].tolist()  # aligned with the split's rows
    assert table_files(files=str(tmp_path / "t.jsonl"), feature_columns=["x0"]).train_domains is None
    with pytest.raises(KDistillError, match="column 'sorce' is not in the data"):
        table_files(files=str(tmp_path / "t.jsonl"), domain_column="sorce")
    with pytest.raises(KDistillError, match="also in data.feature_columns"):
        table_files(files=str(tmp_path / "t.jsonl"), domain_column="source", feature_columns=["x0", "source"])


def test_ddk_on_a_classification_table_reweights_domains_during_training(tmp_path, monkeypatch):
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    _domain_table(tmp_path / "t.jsonl")
    r = {**CLS, "data": {"files": str(tmp_path / "t.jsonl"), "label_column": "label",
                         "selection": {"method": "ddk", "domain_column": "source", "fraction": 0.5, "every": 2,
                                       "heldout_per_domain": 4}},
         "baseline": True, "train": {"epochs": 2, "batch_size": 16, "lr": 0.01}}
    cfg = load_config(r)
    assert cfg.data.kwargs["domain_column"] == "source"  # one place: every later read of the data drops it
    rep = api.run(r, output=tmp_path / "run", progress=False, quiet=True)
    sel = rep["selection"]
    assert sel["dynamic"] and sel["domains"] == ["easy", "noisy", "tiny"] and sel["heldout"] == 8  # tiny too small
    steps = math.ceil(sel["budget"] / 16)  # each epoch draws the budget, not the pool
    for phase in ("student", "baseline"):
        hist = sel[f"{phase}_reweighting"]
        assert [h["step"] for h in hist] == list(range(0, 2 * steps + 1, 2))[: len(hist)] and len(hist) >= steps
        w = hist[-1]["weights"]
        # DDK weighs a domain by the student's loss over the teacher's: on the easy one the teacher is nearly
        # perfect and the student a multiple of its loss; on the noisy one the teacher is no better than chance
        assert abs(sum(w) - 1) < 1e-9 and w[0] > w[1]
    assert rep["data"]["train"] == 192  # the whole pool (80% of 240 rows): DDK draws from it during training
    # the saved student re-reads its data without the domain column among the features
    assert api.evaluate(tmp_path / "run")["metrics"]["accuracy"] == rep["student"]["metrics"]["accuracy"]
    static = api.select(r, output=tmp_path / "sel", progress=False)  # `kdistill select`: DDK's static choice
    assert static["method"] == "ddk" and static["budget"] == sel["budget"]
    with pytest.raises(ConfigError, match="expected your own files"):
        load_config({**CLS, "data": {"name": "wine", "selection": {"method": "ddk", "domain_column": "x"}}})
    with pytest.raises(ConfigError, match="built-in classification datasets have no domain groups"):
        load_config({**CLS, "data": {"name": "wine", "selection": {"method": "ddk", "groups": "book"}}})
    with pytest.raises(KDistillError, match="needs the domain of every training example"):
        api.run({**CLS, "data": {"name": "wine", "selection": {"method": "ddk"}}}, output=tmp_path / "no",
                progress=False, quiet=True)
