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


# ------------------------------------------------------------------ batched generation, EOS, timing, knob names

def _lively(seed=3):
    """A tiny Llama with large weights: its (near-)greedy continuations vary with the prompt and the step."""
    m = tiny_llama(V, num_layers=2, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return m


def _left_padded(prompts, P, new, pad=0):
    """Rows of ``P`` left-padded prompt tokens + ``new`` placeholder continuation tokens (as the prompt rows of
    ``data.lm.prompt_id_tensors`` lay them out)."""
    from kdistill.data.lm import prompt_id_tensors

    return prompt_id_tensors([(p, [3] * new) for p in prompts], prompt_width=P, max_length=P + new, pad_id=pad)


def _alone(model, prompt, new, eos=None):
    ids = torch.tensor([prompt])
    kw = {"eos_token_id": eos} if eos is not None else {"min_new_tokens": new}
    c = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                       pad_token_id=0, **kw)[0, len(prompt):].tolist()
    return c[: c.index(eos) + 1] if eos is not None and eos in c else c


def test_left_padded_prompts_of_different_lengths_generate_as_alone():
    """One generate call for the micro-batch; each row continues its own prompt as if it were alone (position
    ids follow the attention mask), and padding all rows share is cut and restored around generation."""
    student = _lively()
    prompts = [[5, 9, 11], [7, 8, 9, 10, 12], [13], [14, 15]]
    P, new = 8, 6  # every row has at least 3 pad columns (shared: trimmed before generating)
    batch = _left_padded(prompts, P, new)
    calls = []
    real_generate = student.generate

    def counting_generate(**kw):
        calls.append(kw["input_ids"].shape)
        return real_generate(**kw)

    student.generate = counting_generate
    torch.manual_seed(0)
    out = GKD(lmbda=1.0, sampling_temperature=1e-4).prepare_batch(student, batch, pad_id=0)  # ~greedy
    assert calls == [(4, 5)]  # one call, the 3 shared pad columns cut
    assert torch.equal(out["input_ids"][:, :P], batch["input_ids"][:, :P])
    assert torch.equal(out["attention_mask"][:, :P], batch["attention_mask"][:, :P])
    for r, p in enumerate(prompts):
        assert out["input_ids"][r, P:].tolist() == _alone(student, p, new), r
    # without an EOS every continuation token counts (except one that happens to be the pad id)
    assert torch.equal(out["mask"][:, P - 1:P - 1 + new], out["input_ids"][:, P:] != 0)
    assert not out["mask"][:, :P - 1].any()


def test_rows_stop_at_their_own_eos_and_later_positions_are_masked():
    student = _lively()
    prompts = [[5, 9, 11], [7, 8, 9, 10, 12], [13], [14, 15]]
    P, new = 6, 8
    free = [_alone(student, p, new) for p in prompts]
    eos = next(t for t in free[0][1:5] if t != 0)  # a token row 0 emits early; the others later or never
    ref = [_alone(student, p, new, eos=eos) for p in prompts]
    assert len({len(c) for c in ref}) > 1
    torch.manual_seed(0)
    out = GKD(lmbda=1.0, sampling_temperature=1e-4).prepare_batch(student, _left_padded(prompts, P, new), pad_id=0,
                                                                  eos_id=eos)
    for r, c in enumerate(ref):
        n = len(c)
        assert out["input_ids"][r, P:P + n].tolist() == c
        assert out["attention_mask"][r, P:P + n].all() and not out["attention_mask"][r, P + n:].any()
        counted = out["mask"][r].nonzero().flatten().tolist()
        assert counted == list(range(P - 1, P - 1 + n))  # up to and including the EOS (the student learns to stop)
        assert torch.equal(out["labels"][r, P - 1:P - 1 + n], out["input_ids"][r, P:P + n])


def test_generation_seconds_in_metrics_and_generation_share_in_the_log(tmp_path):
    teacher = tiny_llama(V, num_layers=2, seed=0)
    student = layer_subset_copy(teacher, num_layers=1)
    g = torch.Generator().manual_seed(0)
    blocks = pack_blocks([torch.randint(3, V, (30,), generator=g).tolist() for _ in range(8)], 12, eos_id=2)
    method = GKD(lmbda=1.0, seed=3)
    batch = lm_tensors(blocks[:2], prompt_length=5)
    method.prepare_batch(student, batch, pad_id=0)
    method.prepare_batch(student, batch, pad_id=0)  # two micro-batches of one step add up
    m = method.pop_metrics()
    assert m["on_policy"] == 1.0 and m["generation_seconds"] > 0
    assert GKD(lmbda=0.0).prepare_batch(student, batch) is batch

    def fwd(model, b):
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    loader = make_loader(lm_dataset(blocks, prompt_length=5), 2, seed=0)
    res = fit(student=student, method=method, teacher=teacher, train_loader=loader, accelerator=make_accelerator(),
              student_forward=fwd, teacher_forward=fwd,
              augment=lambda b, rng: method.prepare_batch(student, b, pad_id=0),
              max_steps=2, grad_accum=2, progress=False, log_every=1, output_dir=tmp_path)
    rows = [__import__("json").loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert 0 < row["generation_seconds"] < row["step_seconds"]
        assert row["generation_share"] == pytest.approx(row["generation_seconds"] / row["step_seconds"], rel=1e-5)
    # over the whole run: the ratio of the sums (each row logs one step here)
    whole = sum(r["generation_seconds"] for r in rows) / sum(r["step_seconds"] for r in rows)
    assert res.time_shares == {"generation_share": pytest.approx(whole, rel=1e-5)}


def test_three_knobs_have_three_names():
    """GKD's coin (``lmbda``), sampling temperature and loss temperature are separate arguments; a bare
    ``temperature`` (TRL's name, which drives sampling only) is refused with both names offered."""
    import inspect

    from kdistill import load_config
    from kdistill.errors import ConfigError

    params = inspect.signature(GKD).parameters
    assert {"lmbda", "sampling_temperature", "kd_temperature"} <= set(params) and "temperature" not in params
    m = GKD(lmbda=0.25, sampling_temperature=0.7, kd_temperature=2.0)
    assert (m.lmbda, m.sampling_temperature, m.kd_temperature) == (0.25, 0.7, 2.0)
    with pytest.raises(ConfigError, match="kd_temperature' or 'sampling_temperature"):
        load_config("llm/tiny", ["method={name: gkd, kwargs: {temperature: 1.0}}", "data.prompt_tokens=8"])
    for name, bad in (("lmbda", 1.5), ("sampling_temperature", 0.0), ("kd_temperature", -1.0)):
        with pytest.raises(KDistillError, match=name):
            GKD(**{name: bad})
