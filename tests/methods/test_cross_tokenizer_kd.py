"""cross_tokenizer_kd: the terms on a hand-made alignment, zero for one model read through the cross path, gradients,
and a few training steps with a student that has its own tokenizer."""

from __future__ import annotations

import math

import pytest
import torch

from kdistill.data.align import cross_blocks, teacher_view, vocab_map
from kdistill.data.loaders import TensorDictDataset, make_loader
from kdistill.errors import KDistillError
from kdistill.losses.cross_tokenizer import span_kl
from kdistill.losses.logits import uld
from kdistill.methods.base import ModelOutput
from kdistill.methods.cross_tokenizer_kd import CrossTokenizerKD
from kdistill.methods.llm_kd import LLMKD
from kdistill.teachers.tiny import tiny_llama, train_tokenizer
from kdistill.teachers.vocab import check_vocab
from kdistill.train import fit, make_accelerator

TEXTS = ["In the beginning God created the heaven and the earth.",
         "And the earth was without form, and void; and darkness was upon the face of the deep.",
         "And God said, Let there be light: and there was light."] * 8


def _hand_batch():
    """Student tokens "ab" "cd" "e"; teacher tokens "ab" "c" "d" "e" (ids are arbitrary). Groups after the first:
    g0 = "cd" (1 student token, 2 teacher tokens: merged), g1 = "e" (exact)."""
    long = lambda x: torch.tensor([x])  # noqa: E731
    return {"input_ids": long([0, 1, 2]), "labels": long([1, 2, -100]), "mask": long([1, 1, 0]).bool(),
            "teacher_input_ids": long([0, 1, 2, 3]), "teacher_attention_mask": long([1, 1, 1, 1]),
            "student_group": long([0, 1, -1]), "teacher_group": long([0, 0, 1, -1]),
            "group_student_start": long([0, 1, -1]), "group_teacher_start": long([0, 2, -1]),
            "group_exact": long([0, 1, 0]).bool()}


def test_terms_on_a_hand_made_alignment():
    torch.manual_seed(0)
    zs, zt = torch.randn(1, 3, 5), torch.randn(1, 4, 6)
    m = CrossTokenizerKD()
    m.set_vocab_map(torch.tensor([2, 4]), torch.tensor([3, 5]))  # student "e" = teacher "e", and one more
    out = m(ModelOutput(zs), ModelOutput(zt), _hand_batch())
    ls, lt = zs.log_softmax(-1), zt.log_softmax(-1)
    # merged "cd": the student's p("cd" | ab) against the teacher's chain p("c" | ab) p("d" | abc)
    p_s, p_t = ls[0, 0, 1], lt[0, 0, 1] + lt[0, 1, 2]
    torch.testing.assert_close(out["merged"], span_kl(p_s, p_t))
    torch.testing.assert_close(out["uld"], uld(zs[0, 0], zt[0, 0]))
    # exact "e": student position 1 vs teacher position 2, on the shared tokens + a rest bucket
    q_s, q_t = ls[0, 1].exp()[[2, 4]], lt[0, 2].exp()[[3, 5]]
    r_s, r_t = 1 - q_s.sum(), 1 - q_t.sum()
    want = (q_t * (q_t / q_s).log()).sum() + r_t * (r_t / r_s).log()
    torch.testing.assert_close(out["matched"], want, rtol=1e-5, atol=1e-6)
    assert m.pop_metrics()["exact_share"] == 0.5


def test_zero_for_one_model_through_the_cross_path_and_gradients():
    tok = train_tokenizer(TEXTS, vocab_size=300)
    lm = tiny_llama(len(tok), num_layers=1, seed=0)
    batch = cross_blocks(tok, tok, TEXTS, block_length=16, max_blocks=4)
    m = CrossTokenizerKD(kd_temperature=2.0)
    m.set_vocab_map(*vocab_map(tok, tok))
    with torch.no_grad():
        zt = lm(**teacher_view(batch)).logits
    zs = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = m(ModelOutput(zs), ModelOutput(zt), batch)
    assert all(float(v.detach()) == 0.0 for v in out.values())
    # another student: finite, positive, gradients reach it
    other = tiny_llama(len(tok), num_layers=1, seed=1)
    s_tok = train_tokenizer(TEXTS, vocab_size=280)
    student = tiny_llama(len(s_tok), num_layers=1, seed=2)
    b2 = cross_blocks(s_tok, tok, TEXTS, block_length=16, max_blocks=4)
    m2 = CrossTokenizerKD()
    m2.set_vocab_map(*vocab_map(s_tok, tok))
    with torch.no_grad():
        zt = other(**teacher_view(b2)).logits
    out = m2(ModelOutput(student(input_ids=b2["input_ids"], attention_mask=b2["attention_mask"]).logits),
             ModelOutput(zt), b2)
    assert {"matched", "merged", "uld"} <= set(out) and all(float(v.detach()) > 0 for v in out.values())
    sum(out.values()).backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_same_tokenizer_without_alignment_is_forward_kl_and_errors():
    zs, zt = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    mask = torch.ones(2, 4, dtype=torch.bool)
    out = CrossTokenizerKD()(ModelOutput(zs), ModelOutput(zt), {"mask": mask})
    want = (zt.softmax(-1) * (zt.log_softmax(-1) - zs.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(out["matched"], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(KDistillError, match="no vocabulary map"):
        CrossTokenizerKD()(ModelOutput(torch.randn(1, 3, 5)), ModelOutput(torch.randn(1, 4, 6)), _hand_batch())
    with pytest.raises(KDistillError, match="a number >= 0"):
        CrossTokenizerKD(uld_weight=-1.0)
    assert CrossTokenizerKD().cross_tokenizer and LLMKD(loss="uld").cross_tokenizer
    assert not LLMKD().cross_tokenizer


def test_check_vocab_accepts_different_tokenizers_only_for_a_cross_tokenizer_method():
    a, b = train_tokenizer(TEXTS, vocab_size=300), train_tokenizer(TEXTS, vocab_size=280)
    with pytest.raises(KDistillError, match="cross_tokenizer_kd.*loss: uld"):
        check_vocab(len(a), len(b), a, b)
    plan = check_vocab(len(a), len(b), a, b, cross_tokenizer=True)
    assert plan.cross and not plan.is_identity and plan.student_tokenizer_size == len(b)
    z = torch.randn(1, 2, len(b))
    assert plan.align_student(z) is z


@pytest.mark.parametrize("method", [CrossTokenizerKD(ce_weight=0.5), LLMKD(loss="uld", alpha=0.5)],
                         ids=["cross_tokenizer_kd", "llm_kd_uld"])
def test_three_steps_with_a_student_of_its_own_tokenizer(method, tmp_path):
    t_tok, s_tok = train_tokenizer(TEXTS, vocab_size=300), train_tokenizer(TEXTS, vocab_size=340)
    teacher, student = tiny_llama(len(t_tok), seed=0), tiny_llama(len(s_tok), num_layers=1, seed=1)
    data = cross_blocks(s_tok, t_tok, TEXTS, block_length=16, max_blocks=12)
    method.set_vocab_map(*vocab_map(s_tok, t_tok))
    before = [p.detach().clone() for p in student.parameters()]

    def s_fwd(model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def t_fwd(model, batch):
        return model(**teacher_view(batch)).logits

    res = fit(student=student, method=method, train_loader=make_loader(TensorDictDataset(**data), 4, seed=0),
              accelerator=make_accelerator("no"), teacher=teacher, student_forward=s_fwd, teacher_forward=t_fwd,
              epochs=1, max_steps=3, lr=1e-3, output_dir=tmp_path, progress=False)
    assert res.steps == 3 and all(math.isfinite(v) for row in res.history for k, v in row.items()
                                  if isinstance(v, float))
    assert any(not torch.equal(a, p) for a, p in zip(before, student.parameters()))
