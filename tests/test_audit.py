"""Audits (kdistill.eval.audit, `kdistill audit RUN_DIR`) on cases with a known answer: a proxy/golden pair with a
known turning point, a tiny model that memorised its data (extraction rate 1) vs a random one (0), a memorised canary
(maximal exposure) vs an untrained model, the shifted-domain corpus, and the audit of a tiny `kdistill run`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from kdistill import api
from kdistill.config import load_config
from kdistill.data.lm import canary_texts, insert_canaries, lm_tensors, shift_texts
from kdistill.errors import ConfigError, KDistillError
from kdistill.eval.audit import (
    PROXY,
    canary_exposure,
    extraction_rate,
    extraction_window,
    extrapolation,
    hull_agreement,
    proxy_from_log,
    proxy_kl,
    proxy_targets,
    teacher_hacking,
)
from kdistill.losses.logits import forward_kl
from kdistill.teachers.tiny import tiny_llama, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------ teacher hacking


def _history(golden, proxy, steps=None):
    steps = steps or [10 * i for i in range(len(golden))]
    return [{"step": s, "perplexity": g, PROXY: p} for s, g, p in zip(steps, golden, proxy)]


def test_teacher_hacking_flags_the_turning_point():
    steps = list(range(0, 110, 10))
    golden = [10 + (s - 50) ** 2 / 100 for s in steps]  # best at step 50, then rising
    proxy = [5 - s / 50 for s in steps]  # falls all along
    out = teacher_hacking(_history(golden, proxy, steps))
    assert out["flagged"] and out["step"] == 50 and out["peak_step"] == 100 and not out["recovered"]
    assert out["golden_best"] == 10 and out["golden_peak"] == 35 and out["proxy_at_peak"] < out["proxy_at_best"]
    # the same curves with the turning point moved to step 70: flagged there
    golden = [10 + (s - 70) ** 2 / 100 for s in steps]
    assert teacher_hacking(_history(golden, proxy, steps))["step"] == 70
    # an episode that ends: the golden metric rises for four evaluations after step 30, then falls below its best
    golden = [9.0, 8.0, 7.0, 6.0, 7.0, 8.0, 7.5, 6.5, 5.0, 4.0, 3.0]
    out = teacher_hacking(_history(golden, proxy, steps))
    assert out["flagged"] and out["step"] == 30 and out["peak_step"] == 50 and out["golden_peak"] == 8.0
    assert out["recovered"] and out["episode_end"] == 80 and "back at its step-30 value" in out["reason"]


def test_teacher_hacking_leaves_healthy_and_overfitting_runs_alone():
    steps = list(range(0, 110, 10))
    falling = [5 - s / 50 for s in steps]
    monotone = teacher_hacking(_history([20 - s / 10 for s in steps], falling, steps))  # both keep falling
    assert not monotone["flagged"] and monotone["step"] is None and "never rose" in monotone["reason"]
    golden = [10 + (s - 50) ** 2 / 100 for s in steps]
    rising_proxy = [1 + (s - 50) ** 2 / 1000 for s in steps]  # the proxy turns up too: over-fitting
    over = teacher_hacking(_history(golden, rising_proxy, steps))
    assert not over["flagged"] and "over-fitting" in over["reason"]
    # the golden metric turns up only at the last two evaluations: fewer than patience = 3
    late = [20 - s / 10 for s in steps[:-2]] + [13.0, 14.0]
    assert not teacher_hacking(_history(late, falling, steps))["flagged"]
    assert teacher_hacking(_history(late, falling, steps), patience=2)["flagged"]
    few = teacher_hacking(_history([3.0, 2.0, 4.0], [1.0, 0.5, 0.1]))
    assert not few["flagged"] and "at least 5" in few["reason"]
    with pytest.raises(KDistillError, match="patience"):
        teacher_hacking([], patience=0)


def test_proxy_from_log_averages_the_loss_term_between_evaluations():
    history = [{"step": 2, "perplexity": 9.0}, {"step": 4, "perplexity": 8.0}, {"step": 6, "perplexity": 7.0}]
    rows = [{"step": s, "kd": float(s), "loss": 0.0} for s in (1, 2, 3, 4)]  # nothing logged after step 4
    out, name = proxy_from_log(history, rows, term="kd")
    assert name == "train_kd" and [h["step"] for h in out] == [2, 4]
    assert [h["train_kd"] for h in out] == [1.5, 3.5] and out[0]["perplexity"] == 9.0


# ------------------------------------------------------------------------------------------ proxy


def _model(vocab=48, seed=0, hidden=32, layers=2):
    return tiny_llama(vocab, hidden_size=hidden, num_layers=layers, num_heads=2, seed=seed)


def test_proxy_kl_is_zero_for_the_teacher_and_the_full_kl_at_k_equal_v():
    teacher, student = _model(seed=0), _model(seed=1)
    rows = lm_tensors(torch.randint(3, 48, (3, 12), generator=torch.Generator().manual_seed(0)))
    targets = proxy_targets(rows, teacher=teacher, k=48, batch_size=2)
    assert proxy_kl(teacher, targets, batch_size=2) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        t, s = (m(input_ids=rows["input_ids"]).logits for m in (teacher, student))
    full = forward_kl(s, t, kd_temperature=1.0)[rows["mask"]].mean()  # k = V: no residual, the exact KL
    assert proxy_kl(student, targets, batch_size=3) == pytest.approx(float(full), rel=1e-4)
    small = proxy_targets(rows, teacher=teacher, k=4, batch_size=2)  # top-k: a lower bound of the full KL
    assert 0 < proxy_kl(student, small) < float(full)
    with pytest.raises(KDistillError, match="no cached top-k targets and no teacher"):
        proxy_targets(rows)


# ------------------------------------------------------------------------------------------ memorisation


def _overfit(model, blocks, steps=80, lr=2e-2):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    data = lm_tensors(blocks)
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(input_ids=data["input_ids"]).logits[data["mask"]],
                                                 data["labels"][data["mask"]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_extraction_rate_is_one_after_memorising_and_zero_for_a_random_model():
    torch.manual_seed(0)
    blocks = torch.randint(3, 48, (2, 24), generator=torch.Generator().manual_seed(1))
    seqs = blocks.tolist()
    random_model = _model(seed=2)
    assert extraction_rate(random_model, seqs, prefix_tokens=8, continuation_tokens=16)["extraction_rate"] == 0.0
    memorised = _overfit(_model(seed=2), blocks)
    res = extraction_rate(memorised, seqs, prefix_tokens=8, continuation_tokens=16, samples=64)
    assert res["extraction_rate"] == 1.0 and res["token_match_rate"] == 1.0 and res["samples"] == 2
    # the teacher-forced check is what greedy generation does: it reproduces the 16 tokens
    gen = memorised.generate(input_ids=blocks[:, :8], attention_mask=torch.ones_like(blocks[:, :8]),
                             do_sample=False, max_new_tokens=16, min_new_tokens=16, pad_token_id=0)
    assert torch.equal(gen[:, 8:24], blocks[:, 8:24])
    # another sequence of the same data it never saw is not extracted
    unseen = torch.randint(3, 48, (4, 24), generator=torch.Generator().manual_seed(9)).tolist()
    assert extraction_rate(memorised, unseen, prefix_tokens=8, continuation_tokens=16)["extraction_rate"] == 0.0


def test_extraction_window_fits_short_blocks_and_refuses_nothing_to_extract():
    assert extraction_window([[1] * 128], prefix_tokens=32, continuation_tokens=32)[:2] == (32, 32)
    k, m, note = extraction_window([[1] * 32], prefix_tokens=32, continuation_tokens=32)
    assert (k, m) == (16, 16) and "used a 16-token prefix" in note
    with pytest.raises(KDistillError, match="no training sequence holds"):
        extraction_rate(_model(), [[1, 2, 3]], prefix_tokens=2, continuation_tokens=2)


def test_canaries_are_inserted_deterministically():
    items = [f"text {i}" for i in range(20)]
    out = insert_canaries(items, count=2, repeats=3, length=6, seed=4)
    canaries = canary_texts(count=2, length=6, seed=4)
    assert len(set(canaries)) == 2 and all(c.startswith("my secret number is ") for c in canaries)
    assert all(len(c.split()) == 4 + 6 for c in canaries)
    assert [x for x in out if x not in canaries] == items and all(out.count(c) == 3 for c in canaries)
    assert out == insert_canaries(items, count=2, repeats=3, length=6, seed=4)
    assert canary_texts(count=2, length=6, seed=5) != canaries
    with pytest.raises(KDistillError, match="distinct secrets"):
        canary_texts(count=8, length=1)


def test_canary_exposure_is_maximal_after_memorising_and_low_untrained():
    canary = canary_texts(count=1, length=6, seed=0)[0]
    tok = train_tokenizer([canary, "my secret number is 0 1 2 3 4 5 6 7 8 9", "some other words"], vocab_size=300)
    ids = [tok.eos_token_id] + tok(canary, add_special_tokens=False)["input_ids"]
    untrained = tiny_llama(len(tok), hidden_size=32, num_layers=2, num_heads=2, seed=3)
    before = canary_exposure(untrained, tok, canary, candidates=128, seed=1)
    assert before["candidates"] == 128 and before["max_exposure"] == pytest.approx(7.0)
    assert before["exposure"] < 4.0
    trained = _overfit(tiny_llama(len(tok), hidden_size=32, num_layers=2, num_heads=2, seed=3),
                       torch.tensor([ids]), steps=100)
    after = canary_exposure(trained, tok, canary, candidates=128, seed=1)
    assert after["rank"] == 1 and after["exposure"] == pytest.approx(7.0)
    # the memorised canary is also extracted: its digits follow greedily from the prefix
    k = len(ids) - 6
    assert extraction_rate(trained, [ids], prefix_tokens=k, continuation_tokens=6)["extraction_rate"] == 1.0
    with pytest.raises(KDistillError, match="expected a canary"):
        canary_exposure(trained, tok, "not a canary")


# ------------------------------------------------------------------------------------------ shift / extrapolation


@pytest.mark.resources
def test_the_wordnet_shift_corpus_loads_and_differs_from_kjv():
    from kdistill.data.lm import lm_corpus

    wn = shift_texts(name="wordnet")
    kjv = shift_texts(name="kjv")
    assert len(wn) > 5000 and all(":" in t for t in wn[:50])
    assert not set(wn) & set(kjv)
    train, held = lm_corpus(name="wordnet")
    assert held == wn and not set(train) & set(held)
    pos = {t.split(": ", 1)[0] for t in held[:2000]}  # the held-out end mixes parts of speech, not only adverbs
    assert len(pos) > 1000
    # WordNet prose and KJV verses: different words
    wn_words = {w for t in wn[:2000] for w in t.lower().split()}
    kjv_words = {w for t in kjv for w in t.lower().split()}
    assert len(wn_words & kjv_words) / len(wn_words) < 0.5
    assert shift_texts(name="texts", texts=["a b"]) == ["a b"]


def test_extrapolation_ratios():
    held = {"teacher": {"perplexity": 10.0}, "student": {"perplexity": 20.0}}
    shift = {"teacher": {"perplexity": 30.0}, "student": {"perplexity": 90.0}}
    assert extrapolation(held, shift) == {"student": {"held_out_ratio": 2.0, "shift_ratio": 3.0, "gap": 1.5}}


def test_hull_agreement_of_a_copy_and_of_a_constant_student():
    w = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(1))

    def teacher(xb):
        return xb @ w

    same = hull_agreement(teacher, teacher, x, samples=256)
    assert same == {"train_agreement": 1.0, "mixup_agreement": 1.0, "noise_agreement": 1.0}
    const = hull_agreement(teacher, lambda xb: torch.tensor([[1.0, 0, 0]]).expand(len(xb), 3), x, samples=512)
    assert 0.1 < const["train_agreement"] < 0.6  # the share of inputs the teacher puts in class 0


# ------------------------------------------------------------------------------------------ config


def test_config_checks_for_shift_canaries_and_audit():
    cfg = load_config("llm/tiny", ["eval.shift={name: wordnet, tokens: 256}", "data.canaries={count: 2}"])
    assert cfg.eval.shift.name == "wordnet" and cfg.data.canaries.repeats == 10 and cfg.eval.audit.enabled
    with pytest.raises(ConfigError, match="eval.shift name 'files' needs exactly one"):
        load_config("llm/tiny", ["eval.shift={name: files}"])
    with pytest.raises(ConfigError, match="canary_candidates"):
        load_config("llm/tiny", ["eval.audit.canary_candidates=1"])
    with pytest.raises(ConfigError, match="canaries are inserted"):
        load_config("llm/tiny", ["data.canaries={count: 1}", "data.prompt_column=p", "data.completion_column=c",
                                 "data.prompt_tokens=4", "data.name=files", "data.files=x.jsonl"])


@pytest.mark.resources
def test_the_smollm2_recipe_measures_the_wordnet_shift():
    cfg = load_config("llm/smollm2_kjv")
    assert cfg.eval.shift is not None and cfg.eval.shift.name == "wordnet" and cfg.eval.shift.tokens == 4096


# ------------------------------------------------------------------------------------------ kdistill audit


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "run"
    report = api.run("llm/tiny", output=out, progress=False, quiet=True,
                     overrides=["train.max_steps=6", "train.eval_every=1", "eval.shift={name: texts, tokens: 64, "
                                "texts: ['Thou shalt not kill.', 'Blessed are the meek: for they shall inherit the "
                                "earth.', 'Jesus wept.']}", "eval.audit.extraction_samples=8"])
    return out, report


def test_a_tiny_run_reports_shift_proxy_and_audits(tiny_run):
    out, r = tiny_run
    assert set(r["shift"]) == {"teacher", "baseline", "student", "source"} and r["shift"]["source"]["tokens"] == 64
    assert {"perplexity", "top1_agreement", "kl_teacher_student_topk"} <= set(r["shift"]["student"])
    hist = r["student"]["history"]
    assert [h["step"] for h in hist] == [1, 2, 3, 4, 5, 6] and all(h[PROXY] >= 0 for h in hist)
    assert r["audits"]["teacher_hacking"]["evaluations"] == 6
    assert set(r["audits"]["memorization"]) == {"teacher", "baseline", "student"}
    md = (out / "report.md").read_text()
    assert "## Audits" in md and "Interpolation vs extrapolation" in md and (out / "audit_teacher_hacking.png").exists()


def test_kdistill_audit_writes_audit_json(tiny_run):
    out, r = tiny_run
    res = api.audit(out, samples=16)
    saved = json.loads((out / "audit.json").read_text())
    assert saved == json.loads(json.dumps(res))
    sh = saved["shift"]
    for name in ("teacher", "baseline", "student"):
        assert math.isfinite(sh[name]["perplexity"]) and name in sh["held_out"]
        e = saved["memorization"][name]
        assert {"extraction_rate", "prefix_tokens", "continuation_tokens", "samples"} <= set(e)
        assert 0.0 <= e["extraction_rate"] <= 1.0 and e["samples"] == 16
    assert {"perplexity", "top1_agreement", "kl_teacher_student_topk"} <= set(sh["student"])
    # the teacher is rebuilt from the config: its shifted perplexity is the run's
    assert sh["teacher"]["perplexity"] == pytest.approx(r["shift"]["teacher"]["perplexity"], rel=1e-5)
    th = saved["teacher_hacking"]
    assert {"flagged", "step", "proxy", "golden"} <= set(th) and th["proxy"] == PROXY and th["golden"] == "perplexity"
    assert isinstance(th["flagged"], bool) and (th["step"] is None) == (not th["flagged"])
    assert "Teacher hacking" in (out / "audit.md").read_text() and (out / "audit_teacher_hacking.png").exists()


@pytest.mark.resources
def test_kdistill_audit_of_an_older_run_uses_the_checkpoint_history_and_the_training_loss(tmp_path):
    old = tmp_path / "old"
    api.run("llm/tiny", output=old, progress=False, quiet=True,  # audits off: no proxy logged, as before them
            overrides=["train.max_steps=6", "train.eval_every=1", "eval.audit.enabled=false", "baseline=false"])
    report = json.loads((old / "report.json").read_text())
    assert "audits" not in report and "shift" not in report and "train_kl_topk" not in report["student"]["history"][0]
    report["student"].pop("history")  # an older report: the history is only in the last checkpoint
    (old / "report.json").write_text(json.dumps(report))
    cfg = json.loads((old / "config.json").read_text())
    for section, key in (("eval", "shift"), ("eval", "audit"), ("data", "canaries")):  # an older config
        cfg[section].pop(key)
    (old / "config.json").write_text(json.dumps(cfg))
    res = api.audit(old, samples=4)
    th = res["teacher_hacking"]
    assert th["proxy"] == "train_kd" and "stands in" in th["source"] and th["evaluations"] == 6
    assert [p["step"] for p in th["curve"]] == [1, 2, 3, 4, 5, 6]
    assert res["shift"]["source"] == {"name": "wordnet", "tokens": 4096}  # no eval.shift: WordNet glosses
    assert set(res["memorization"]) == {"teacher", "student"}  # no baseline in this run


def test_kdistill_audit_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(KDistillError, match="not a finished run folder"):
        api.audit(tmp_path)
    from kdistill.cli import app

    res = CliRunner().invoke(app, ["audit", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "not a finished run folder" in res.output


def test_kdistill_audit_of_a_classifier_run(tmp_path):
    recipe = {"name": "wine_audit", "task": "classification", "seed": 1, "data": {"name": "wine"},
              "teacher": {"model": {"name": "mlp", "kwargs": {"width": 32}},
                          "train": {"epochs": 8, "batch_size": 16, "lr": 0.01}},
              "student": {"name": "mlp", "kwargs": {"width": 4, "depth": 1}},
              "method": {"name": "hinton_kd", "kwargs": {"kd_temperature": 2.0}},
              "train": {"epochs": 3, "batch_size": 16, "lr": 0.01}, "eval": {"latency_repeats": 2}}
    api.run(recipe, output=tmp_path / "run", progress=False, quiet=True)
    res = api.audit(tmp_path / "run")
    agreement = res["extrapolation"]["student"]
    assert set(agreement) == {"train_agreement", "mixup_agreement", "noise_agreement"}
    assert all(0.0 <= v <= 1.0 for v in agreement.values())
    assert res == api.audit(tmp_path / "run")  # seeded: the same inputs every time
    assert "mixup" in (tmp_path / "run" / "audit.md").read_text()
