"""llm_kd: every loss by name with kd_temperature, T^2 / alpha weighting, top-k cache path, chunking,
TAID schedule state, config validation, and 3 training steps on tiny Llamas (teacher and cache)."""

from __future__ import annotations

import math

import pytest
import torch

from kdistill.config import MethodSpec
from kdistill.data.lm import cache_dataset, lm_dataset, pack_blocks
from kdistill.data.loaders import make_loader
from kdistill.errors import KDistillError, UnknownNameError
from kdistill.losses import logits as L
from kdistill.losses.reduce import masked_mean
from kdistill.losses.topk import teacher_topk
from kdistill.methods.base import ModelOutput
from kdistill.methods.llm_kd import LLMKD, LOSSES
from kdistill.students.llm import layer_subset_copy
from kdistill.teachers.cache import TopKCache, model_fingerprint, write_topk_cache
from kdistill.teachers.tiny import tiny_llama
from kdistill.train import fit, make_accelerator

KW = {"generalized_jsd": {"beta": 0.3}, "skew_kl": {"skew": 0.2}, "skew_reverse_kl": {"skew": 0.2},
      "taid": {"t_start": 0.5}, "token_selective": {"entropy_weight": 0.05}}


def _batch(B=2, T=5, V=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(B, T, V, generator=g), torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, -1] = -100
    return s, t, {"labels": labels, "mask": labels != -100}


@pytest.mark.parametrize("loss", list(LOSSES))
def test_every_loss_by_name_with_temperature_and_its_scaling(loss):
    s, t, batch = _batch()
    m = LLMKD(loss=loss, kd_temperature=2.0, loss_kwargs=KW.get(loss, {})).eval()
    out = m(ModelOutput(s), ModelOutput(t), batch)
    kw = {k: v for k, v in KW.get(loss, {}).items() if k != "t_start"}
    if loss == "taid":
        kw["t"] = 0.5
    scale = 2.0 if loss in ("tvd", "uld") else 4.0  # T for the L1-type losses, T^2 for the KL family
    want = scale * masked_mean(LOSSES[loss](s, t, kd_temperature=2.0, **kw), batch["mask"])
    assert torch.allclose(out["kd"], want, atol=1e-6)
    assert set(out) == {"kd"}


def test_alpha_mixes_label_ce():
    s, t, batch = _batch()
    out = LLMKD(alpha=0.25, kd_temperature=1.0)(ModelOutput(s), ModelOutput(t), batch)
    ce = masked_mean(L.cross_entropy(s, batch["labels"]), batch["mask"])
    assert torch.allclose(out["ce"], 0.75 * ce) and torch.allclose(
        out["kd"], 0.25 * masked_mean(L.forward_kl(s, t), batch["mask"]))


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "skew_kl", "tvd"])
def test_cached_topk_at_full_k_equals_logits_and_chunking_is_exact(loss):
    s, t, batch = _batch(V=16)
    lp, idx, res = teacher_topk(t, k=16, kd_temperature=2.0)
    m = LLMKD(loss=loss, kd_temperature=2.0)
    full = m(ModelOutput(s), ModelOutput(t), batch)["kd"]
    cached = m(ModelOutput(s), ModelOutput(None, extra={"topk_logprobs": lp.half().float(), "topk_indices": idx,
                                                          "log_residual": res, "kd_temperature": 2.0}), batch)["kd"]
    assert torch.allclose(full, cached, atol=2e-3)
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    LLMKD(loss=loss, kd_temperature=2.0)(ModelOutput(s1), ModelOutput(t), batch)["kd"].backward()
    LLMKD(loss=loss, kd_temperature=2.0, chunk_size=3)(ModelOutput(s2), ModelOutput(t), batch)["kd"].backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-7)


def test_cache_mismatches_refused():
    s, t, batch = _batch()
    lp, idx, res = teacher_topk(t, k=4, kd_temperature=1.0)
    extra = {"topk_logprobs": lp, "topk_indices": idx, "log_residual": res, "kd_temperature": 1.0}
    with pytest.raises(KDistillError, match="kd_temperature=1.0"):
        LLMKD(kd_temperature=2.0)(ModelOutput(s), ModelOutput(None, extra=extra), batch)
    with pytest.raises(KDistillError, match="uld"):
        LLMKD(loss="uld")(ModelOutput(s), ModelOutput(None, extra=extra), batch)
    with pytest.raises(KDistillError, match="neither logits"):
        LLMKD()(ModelOutput(s), ModelOutput(None), batch)


def test_bad_arguments_fail_at_config_time():
    with pytest.raises(UnknownNameError, match="skew_kl"):
        LLMKD(loss="skew_kll")
    with pytest.raises(UnknownNameError, match="skew"):
        LLMKD(loss="skew_kl", loss_kwargs={"skw": 0.1})
    with pytest.raises(KDistillError, match="method argument"):
        LLMKD(loss_kwargs={"kd_temperature": 2.0})
    with pytest.raises(KDistillError, match=r"\[0, 1\)"):
        LLMKD(loss="skew_kl", loss_kwargs={"skew": 1.5})
    with pytest.raises(ValueError, match="Did you mean 'loss'"):
        MethodSpec(name="llm_kd", kwargs={"los": "tvd"})
    MethodSpec(name="llm_kd", kwargs={"loss": "taid", "kd_temperature": 2.0, "loss_kwargs": {"total_steps": 10}})


def test_taid_schedule_advances_and_is_checkpointed():
    s, t, batch = _batch()
    m = LLMKD(loss="taid", loss_kwargs={"total_steps": 10, "t_start": 0.4})
    m.train()
    ts = []
    for _ in range(3):
        x = s.clone().requires_grad_(True)
        m(ModelOutput(x), ModelOutput(t), batch)["kd"].backward()
        ts.append(m.pop_metrics()["taid_t"])
    # the first update only records the loss (the authors' schedule), later ones move t
    assert ts[0] == ts[1] == pytest.approx(0.4) and ts[2] > ts[1]
    state = m.state_dict()
    m2 = LLMKD(loss="taid", loss_kwargs={"total_steps": 10, "t_start": 0.4})
    m2.load_state_dict(state)
    m.eval(), m2.eval()
    a = m(ModelOutput(s), ModelOutput(t), batch)["kd"]
    b = m2(ModelOutput(s), ModelOutput(t), batch)["kd"]
    assert torch.equal(a, b)
    # after 3 updates t is at least the linear floor of the last one, t_start + (t_end - t_start) * 2 / total_steps
    assert m.pop_metrics()["taid_t"] >= 0.4 + 0.6 * 2 / 10 - 1e-9
    assert m2.pop_metrics()["taid_t"] >= 0.4 + 0.6 * 2 / 10 - 1e-9


# ------------------------------------------------------------------------------- 3 steps on tiny Llamas

V = 64


def _models():
    teacher = tiny_llama(V, num_layers=4, seed=0)
    student = layer_subset_copy(teacher, num_layers=2)
    return teacher, student


def _forward(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _blocks(n=12, L=16):
    g = torch.Generator().manual_seed(0)
    return pack_blocks([torch.randint(3, V, (40,), generator=g).tolist() for _ in range(n)], L, eos_id=2)


def test_three_steps_with_teacher_model():
    teacher, student = _models()
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    loader = make_loader(lm_dataset(_blocks()), 4, seed=0)
    res = fit(student=student, method=LLMKD(loss="skew_kl", kd_temperature=2.0, alpha=0.5), teacher=teacher,
              train_loader=loader, accelerator=make_accelerator(), student_forward=_forward, teacher_forward=_forward,
              max_steps=3, epochs=1, progress=False, log_every=1, lr=1e-2)
    assert res.steps == 3
    assert all(math.isfinite(h) for h in [res.seconds])
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in s0.items())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t0.items())


def test_three_steps_from_topk_cache_without_teacher(tmp_path):
    teacher, student = _models()
    blocks = _blocks()
    root = write_topk_cache(tmp_path / "cache", lambda i, a: _forward(teacher, {"input_ids": i, "attention_mask": a}),
                            blocks.tolist(), k=8, kd_temperature=2.0, teacher_fingerprint=model_fingerprint(teacher),
                            tokenizer_hash="t", vocab_size=V, shard_size=5)
    cache = TopKCache(root, expect={"k": 8, "kd_temperature": 2.0})
    loader = make_loader(cache_dataset(cache), 4, seed=0)

    def targets(batch):
        return ModelOutput(None, extra={"topk_logprobs": batch["topk_logprobs"], "topk_indices": batch["topk_indices"],
                                        "log_residual": batch["log_residual"], "kd_temperature": cache.kd_temperature})

    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    res = fit(student=student, method=LLMKD(loss="forward_kl", kd_temperature=2.0, chunk_size=16),
              teacher_targets=targets, train_loader=loader, accelerator=make_accelerator(), student_forward=_forward,
              max_steps=3, epochs=1, progress=False, log_every=1, lr=1e-2, output_dir=tmp_path / "run")
    assert res.steps == 3
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in s0.items())
    rows = [__import__("json").loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["kd"]) for r in rows)


def test_fused_student_equals_full_logits_in_loss_and_gradients():
    from kdistill.students.llm import fused_student_output

    teacher, student = _models()
    blocks = _blocks(n=4)
    batch = {"input_ids": blocks[:3], "attention_mask": torch.ones_like(blocks[:3])}
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, :-1] = batch["input_ids"][:, 1:]
    batch.update(labels=labels, mask=labels != -100)
    with torch.no_grad():
        t_out = ModelOutput(_forward(teacher, batch))
    student.train()
    full = LLMKD(loss="skew_kl", kd_temperature=2.0)(ModelOutput(_forward(student, batch)), t_out, batch)["kd"]
    full.backward()
    g_full = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    fused = LLMKD(loss="skew_kl", kd_temperature=2.0, fused=True, chunk_size=7)(
        fused_student_output(student, batch), t_out, batch)["kd"]
    fused.backward()
    assert torch.allclose(full, fused, atol=1e-5)
    for n, p in student.named_parameters():
        if n in g_full:
            assert torch.allclose(p.grad, g_full[n], atol=1e-5, rtol=1e-4), n


@pytest.mark.parametrize("loss", ["reverse_kl", "taid"])
def test_fused_teacher_head_with_ce_mix_equals_full_logits(loss):
    """fused=True with alpha < 1 and the teacher's hidden states + head (neither model's logits exist): the kd and
    ce terms and every student gradient equal the unfused method on full logits."""
    from kdistill.students.llm import fused_student_output
    from kdistill.teachers.lm import fused_head_output

    teacher, student = _models()
    blocks = _blocks(n=4)
    batch = {"input_ids": blocks[:3], "attention_mask": torch.ones_like(blocks[:3])}
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, :-1] = batch["input_ids"][:, 1:]
    labels[0, :4] = -100
    batch.update(labels=labels, mask=labels != -100)
    kw = dict(loss=loss, kd_temperature=2.0, alpha=0.4, loss_kwargs=KW.get(loss, {}))
    with torch.no_grad():
        t_logits, t_head = ModelOutput(_forward(teacher, batch)), fused_head_output(teacher, batch)
    assert t_head.logits is None and t_head.extra["hidden"].shape[:2] == batch["input_ids"].shape
    student.train()
    full = LLMKD(**kw)(ModelOutput(_forward(student, batch)), t_logits, batch)
    sum(full.values()).backward()
    g_full = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    fused = LLMKD(**kw, fused=True)(fused_student_output(student, batch), t_head, batch)
    sum(fused.values()).backward()
    assert set(fused) == {"kd", "ce"}
    for k in ("kd", "ce"):
        assert torch.allclose(full[k], fused[k], atol=1e-5), k
    for n, p in student.named_parameters():
        if n in g_full:
            assert torch.allclose(p.grad, g_full[n], atol=1e-5, rtol=1e-4), n


def test_uld_on_cross_tokenizer_rows_pairs_the_ith_reply_token_of_each_side():
    """Rows whose contexts differ in length (teacher_offset): ULD meets the student's i-th reply position with the
    teacher's i-th, up to the shorter reply; the teacher's context positions never enter."""
    from kdistill.methods.base import ModelOutput
    from kdistill.methods.llm_kd import LLMKD

    torch.manual_seed(0)
    zs, zt = torch.randn(2, 8, 5, requires_grad=True), torch.randn(2, 8, 7)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    t_mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 1:4], t_mask[0, 3:7] = True, True  # row 0: student reply at 1-3, teacher's at 3-6 (offset 2)
    mask[1, 4:7], t_mask[1, 2:5] = True, True  # row 1: the teacher's context is 2 tokens shorter (offset -2)
    batch = {"mask": mask, "teacher_mask": t_mask, "teacher_offset": torch.tensor([2, -2]),
             "labels": torch.zeros(2, 8, dtype=torch.long)}
    got = LLMKD(loss="uld", alpha=1.0)(ModelOutput(zs), ModelOutput(zt), batch)["kd"]
    pairs = [(0, 1, 3), (0, 2, 4), (0, 3, 5), (1, 4, 2), (1, 5, 3), (1, 6, 4)]
    want = torch.stack([L.uld(zs[b, i][None], zt[b, j][None])[0] for b, i, j in pairs]).mean()
    assert torch.allclose(got, want, atol=1e-6)
    got.backward()
    assert zs.grad[0, 0].abs().sum() == 0 and zs.grad[0, 1].abs().sum() > 0  # context positions get no gradient
