"""gkd: rank-identical coins, on-policy batch construction, loss formula, 3 on-policy steps on tiny Llamas."""

from __future__ import annotations

import pytest
import torch

from kdistill.data.lm import lm_dataset, lm_tensors, pack_blocks
from kdistill.data.loaders import make_loader
from kdistill.errors import KDistillError
from kdistill.losses import logits as L
from kdistill.losses.reduce import masked_mean
from kdistill.methods.base import ModelOutput
from kdistill.methods.gkd import GKD
from kdistill.students.llm import layer_subset_copy
from kdistill.teachers.tiny import tiny_llama
from kdistill.train import fit, make_accelerator

V = 64


def test_coins_identical_across_ranks_and_resumable():
    rank0, rank1 = GKD(lmbda=0.3, seed=7), GKD(lmbda=0.3, seed=7)
    a = [rank0.draw_coin() for _ in range(400)]
    b = [rank1.draw_coin() for _ in range(400)]
    assert a == b
    assert 0.2 < sum(a) / len(a) < 0.4
    assert [GKD(lmbda=0.3, seed=8).draw_coin() for _ in range(400)] != a
    resumed = GKD(lmbda=0.3, seed=7)
    state = GKD(lmbda=0.3, seed=7)
    for _ in range(100):
        state.draw_coin()
    resumed.load_state_dict(state.state_dict())
    assert [resumed.draw_coin() for _ in range(300)] == a[100:]
    assert not any(GKD(lmbda=0.0).draw_coin() for _ in range(50))
    assert all(GKD(lmbda=1.0).draw_coin() for _ in range(50))


def test_loss_is_t2_jsd_on_continuation_tokens():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 6, 11, generator=g), torch.randn(2, 6, 11, generator=g)
    batch = lm_tensors(torch.randint(0, 11, (2, 6), generator=g), prompt_length=3)
    assert batch["mask"][:, :2].sum() == 0 and batch["mask"][:, 2:5].all() and not batch["mask"][:, 5].any()
    out = GKD(beta=0.0, kd_temperature=2.0)(ModelOutput(s), ModelOutput(t), batch)["gkd"]
    assert torch.allclose(out, 4.0 * masked_mean(L.forward_kl(s, t, kd_temperature=2.0), batch["mask"]))
    out1 = GKD(beta=1.0, kd_temperature=1.0, chunk_size=2)(ModelOutput(s), ModelOutput(t), batch)["gkd"]
    assert torch.allclose(out1, masked_mean(L.reverse_kl(s, t), batch["mask"]), atol=1e-6)


def test_prepare_batch_generates_continuation_from_student():
    student = tiny_llama(V, num_layers=1, seed=1)
    blocks = torch.randint(3, V, (3, 10), generator=torch.Generator().manual_seed(0))
    batch = lm_tensors(blocks, prompt_length=4)
    torch.manual_seed(0)
    out = GKD(lmbda=1.0, sampling_temperature=1.5).prepare_batch(student, batch, pad_id=0)
    assert out["input_ids"].shape == (3, 10)
    assert torch.equal(out["input_ids"][:, :4], blocks[:, :4])
    assert not torch.equal(out["input_ids"][:, 4:], blocks[:, 4:])     # continuation sampled by the student
    assert out["mask"].sum() == 3 * 6 and not out["mask"][:, :3].any()
    assert torch.equal(out["labels"][:, 3:9], out["input_ids"][:, 4:10])
    same = GKD(lmbda=0.0).prepare_batch(student, batch)
    assert same is batch
    bad = dict(batch)
    bad.pop("prompt_length")
    with pytest.raises(KDistillError, match="prompt_length"):
        GKD().prepare_batch(student, bad)


def test_three_on_policy_steps():
    teacher = tiny_llama(V, num_layers=2, seed=0)
    student = layer_subset_copy(teacher, num_layers=1)
    g = torch.Generator().manual_seed(0)
    blocks = pack_blocks([torch.randint(3, V, (30,), generator=g).tolist() for _ in range(8)], 12, eos_id=2)
    loader = make_loader(lm_dataset(blocks, prompt_length=5), 4, seed=0)
    method = GKD(lmbda=0.5, beta=0.5, kd_temperature=2.0, sampling_temperature=1.0, seed=3)

    def fwd(model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def augment(batch, rng):
        return method.prepare_batch(student, batch, pad_id=0)

    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    res = fit(student=student, method=method, teacher=teacher, train_loader=loader, accelerator=make_accelerator(),
              student_forward=fwd, teacher_forward=fwd, augment=augment, max_steps=3, epochs=2, progress=False,
              log_every=1, lr=1e-2)
    assert res.steps == 3
    assert int(method.coin_counter) == 3  # one coin per training micro-batch (the probe batch draws none)
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in s0.items())


def test_generation_stops_at_eos_and_the_eos_counts():
    """A student that always says EOS: each continuation is that one token, which is trained on (the student
    learns to stop); the positions after it are padding, outside the attention and the loss."""
    student = tiny_llama(V, num_layers=1, seed=1)
    head = torch.nn.Linear(student.config.hidden_size, V, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[2] = 50.0  # EOS (id 2) wins every step
    student.lm_head = head
    blocks = torch.randint(3, V, (3, 10), generator=torch.Generator().manual_seed(0))
    batch = lm_tensors(blocks, prompt_length=4)
    prompt_mask = torch.ones(3, 4, dtype=torch.long)
    prompt_mask[0, :2] = 0  # a left-padded prompt
    batch["attention_mask"] = torch.cat([prompt_mask, torch.ones(3, 6, dtype=torch.long)], 1)
    out = GKD(lmbda=1.0).prepare_batch(student, batch, pad_id=0, eos_id=2)
    assert out["input_ids"].shape == (3, 10) and (out["input_ids"][:, 4] == 2).all()
    assert out["mask"].sum() == 3 and out["mask"][:, 3].all()  # position 3 predicts the EOS at 4
    assert out["attention_mask"][:, 5:].sum() == 0 and torch.equal(out["attention_mask"][:, :4], prompt_mask)
