import pytest
import torch

from kdistill.data import TensorDictDataset, make_loader
from kdistill.errors import KDistillError
from kdistill.methods.fitnet import FitNet
from kdistill.methods.hinton_kd import HintonKD
from kdistill.methods.none import NoTeacher
from kdistill.models import build_mlp
from kdistill.train import fit, make_accelerator
from kdistill.train.loop import batch_count


def data(n=100, d=12, c=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)


def models():
    torch.manual_seed(1)
    teacher = build_mlp((12,), 4, width=32, depth=2)
    torch.manual_seed(2)
    student = build_mlp((12,), 4, width=8, depth=2)
    return teacher, student


def train(batch, accum, **kw):
    x, y = data()
    teacher, student = models()
    method = kw.pop("method", None) or FitNet("blocks.1", "blocks.1", alpha=0.5)
    torch.manual_seed(3)
    res = fit(student=student, method=method, teacher=teacher, accelerator=make_accelerator(),
              train_loader=make_loader(TensorDictDataset(inputs=x, labels=y), batch, seed=0), grad_accum=accum,
              epochs=2, optimizer="sgd", lr=0.1, momentum=0.0, schedule="constant", progress=False, **kw)
    return res


def test_grad_accumulation_equals_big_batch_with_uneven_last_batch():
    # 100 examples: batches of 15 -> windows of 2 = 30, 30, 30, 10 (the last window has 15 + ... no: 15,15 | ... | 10)
    a = train(15, 2)
    b = train(30, 1)
    assert a.steps == b.steps == 8
    for (k, va), vb in zip(a.student.state_dict().items(), b.student.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6), k
    for (k, va), vb in zip(a.method.state_dict().items(), b.method.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6), k


def test_naive_mean_of_means_would_differ():
    """The uneven window makes a naive 'mean over micro-batches' differ; the comparison is not vacuous."""
    a = train(15, 2)
    c = train(15, 1)  # a different update rule altogether
    assert any(not torch.allclose(x, y, atol=1e-6) for x, y in zip(a.student.state_dict().values(),
                                                                    c.student.state_dict().values()))


def test_batch_count_uses_mask():
    assert batch_count({"inputs": torch.zeros(5, 3)}) == 5
    assert batch_count({"inputs": torch.zeros(2, 3),
                        "mask": torch.tensor([[True, False, True], [False, False, True]])}) == 3


def test_resume_equals_uninterrupted(tmp_path, interrupt_at):
    full = train(16, 1, method=HintonKD(), output_dir=tmp_path / "full", checkpoint_every=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(16, 1, method=HintonKD(), output_dir=tmp_path / "part", checkpoint_every=3, eval_every=1,
              evaluate=interrupt_at(6))
    torch.manual_seed(12345)  # the resumed process starts with different global RNG state
    resumed = train(16, 1, method=HintonKD(), output_dir=tmp_path / "part", checkpoint_every=3, resume=True)
    assert resumed.steps == full.steps
    for (k, a), b in zip(full.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(a, b), k
    # the metrics log holds each step once
    steps = [__import__("json").loads(ln)["step"]
             for ln in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def test_resume_equals_uninterrupted_with_dropout(tmp_path, interrupt_at):
    """Random ops in the student (dropout) must see the same numbers after a mid-epoch resume: starting the
    resumed epoch's data iterator draws from the global RNG, which the loop restores afterwards."""
    x, y = data()
    teacher, _ = models()

    def run(out, **kw):
        torch.manual_seed(5)
        student = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                                      torch.nn.Linear(16, 4))
        return fit(student=student, method=HintonKD(), teacher=teacher, accelerator=make_accelerator(),
                   train_loader=make_loader(TensorDictDataset(inputs=x, labels=y), 16, seed=0), epochs=2,
                   optimizer="sgd", lr=0.1, schedule="constant", progress=False, output_dir=out,
                   checkpoint_every=3, **kw)

    full = run(tmp_path / "full")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "part", eval_every=1, evaluate=interrupt_at(5))
    torch.manual_seed(999)
    resumed = run(tmp_path / "part", resume=True)  # from step 3: mid-epoch (7 batches per epoch)
    assert resumed.steps == full.steps == 14
    for (k, a), b in zip(full.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(a, b), k


def test_teacher_is_frozen_and_in_eval_mode():
    x, y = data()
    teacher, student = models()
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    fit(student=student, method=HintonKD(), teacher=teacher, accelerator=make_accelerator(),
        train_loader=make_loader(TensorDictDataset(inputs=x, labels=y), 16), max_steps=2, progress=False)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_method_needing_teacher_without_one_fails_early():
    x, y = data()
    _, student = models()
    with pytest.raises(KDistillError, match="needs a teacher"):
        fit(student=student, method=HintonKD(), accelerator=make_accelerator(),
            train_loader=make_loader(TensorDictDataset(inputs=x, labels=y), 16), max_steps=1, progress=False)


def test_non_finite_loss_is_reported():
    x, y = data()
    x[:] = float("nan")
    _, student = models()
    with pytest.raises(KDistillError, match="non-finite loss"):
        fit(student=student, method=NoTeacher(), accelerator=make_accelerator(),
            train_loader=make_loader(TensorDictDataset(inputs=x, labels=y), 16), max_steps=1, progress=False)


def test_metrics_log_and_tensorboard(tmp_path):
    res = train(16, 1, method=HintonKD(), output_dir=tmp_path, log_every=2, tensorboard=True,
                evaluate=lambda m: {"accuracy": 0.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 3 and "kd" in lines[0] and "lr" in lines[0]
    assert any((tmp_path / "tensorboard").iterdir())
    assert res.history and res.history[-1]["step"] == res.steps


def test_bf16_mixed_precision_runs_and_stays_close_to_fp32():
    from accelerate.state import AcceleratorState

    ref = train(16, 1, method=HintonKD())
    x, y = data()
    teacher, student = models()
    torch.manual_seed(3)
    acc = make_accelerator("bf16")
    assert acc.mixed_precision == "bf16"
    res = fit(student=student, method=HintonKD(), teacher=teacher, accelerator=acc,
              train_loader=make_loader(TensorDictDataset(inputs=x, labels=y), 16, seed=0),
              epochs=2, optimizer="sgd", lr=0.1, momentum=0.0, schedule="constant", progress=False)
    make_accelerator("no")  # later tests get fp32 again
    assert AcceleratorState().mixed_precision == "no"
    for a, b in zip(ref.student.state_dict().values(), res.student.state_dict().values()):
        assert b.dtype == torch.float32  # master weights stay fp32
        assert torch.allclose(a, b, atol=0.05)


def test_fp16_without_cuda_is_refused_with_a_fix():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(KDistillError, match="bf16"):
        make_accelerator("fp16")


@pytest.mark.gpu
def test_fp16_on_cuda():
    x, y = data()
    teacher, student = models()
    acc = make_accelerator("fp16")
    res = fit(student=student, method=HintonKD(), teacher=teacher, accelerator=acc,
              train_loader=make_loader(TensorDictDataset(inputs=x, labels=y), 16), max_steps=3, progress=False)
    make_accelerator("no")
    assert res.steps == 3 and next(res.student.parameters()).is_cuda


def test_adamw_is_fused_where_torch_allows_and_matches_the_unfused_update():
    from kdistill.train.optim import build_optimizer

    torch.manual_seed(0)
    a, b = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    b.load_state_dict(a.state_dict())
    fused = build_optimizer(a.parameters(), lr=1e-2, weight_decay=0.1)
    assert fused.param_groups[0]["fused"] is True
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        x = torch.randn(8, 6)
        for m, o in ((a, fused), (b, plain)):
            m(x).square().mean().backward()
            o.step()
            o.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # parameters the fused kernel cannot take fall back to the per-parameter update
    on_meta = torch.nn.Parameter(torch.zeros(3, device="meta"))
    assert not build_optimizer([on_meta]).param_groups[0]["fused"]


def test_plain_runs_call_backward_and_the_optimizer_directly_and_the_schedule_holds():
    """Without a loss scaler, DeepSpeed or XLA the loop calls loss.backward() and the wrapped optimizer's step
    itself (Accelerate's wrappers add a division by 1 and per-call checks); the scheduler is built on that
    optimizer, so it sees every step (no 'lr_scheduler.step() before optimizer.step()' warning) and the cosine
    schedule ends where it should."""
    import types
    import warnings

    from kdistill.train.loop import _direct_calls

    acc = make_accelerator()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    wrapped = types.SimpleNamespace(optimizer=opt, step=lambda: None)
    backward, step = _direct_calls(acc, wrapped)
    assert backward is torch.Tensor.backward and step == opt.step
    scaled = types.SimpleNamespace(scaler=object(), gradient_accumulation_steps=1,
                                   distributed_type=acc.distributed_type, backward=acc.backward)
    backward, step = _direct_calls(scaled, wrapped)
    assert backward == acc.backward and step is wrapped.step

    x, y = data()
    ds = TensorDictDataset(inputs=x, labels=y)
    teacher, student = models()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lr_scheduler.step.*")
        res = fit(student=student, method=HintonKD(), teacher=teacher, train_loader=make_loader(ds, 16, seed=0),
                  accelerator=acc, epochs=2, lr=0.05, schedule="cosine", progress=False)
    assert res.steps == 14
