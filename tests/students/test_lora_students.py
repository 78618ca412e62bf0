"""LoRA students through peft: what trains, what stays, merged export equals the adapted model, refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from kdistill.errors import KDistillError
from kdistill.students.llm import apply_lora, build_lm_student, fused_student_output, is_lora, plain_student
from kdistill.teachers.tiny import tiny_llama
from kdistill.train.optim import build_optimizer

V = 61


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(seed))


def train_steps(model, steps: int = 3) -> None:
    opt = build_optimizer(model.parameters(), optimizer="adamw", lr=1e-2, weight_decay=0.0)
    model.train()
    for i in range(steps):
        x = ids(i)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("train_norms", [False, True])
def test_only_adapters_and_asked_norms_train(train_norms):
    base = tiny_llama(V, num_layers=2, seed=0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_lora(base, r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], train_norms=train_norms)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or (train_norms and "norm" in n) for n in trainable)
    assert any("norm" in n for n in trainable) == train_norms
    assert all(any(t in n for t in ("q_proj", "v_proj", "down_proj")) for n in trainable if "lora_" in n)
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    train_steps(model)
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n], v) for n, v in adapters.items() if "lora_B" in n)  # B starts at 0
    inner = model.get_base_model().state_dict()
    for k, v in before.items():
        key = k.replace(".weight", ".base_layer.weight") if k.replace(".weight", ".base_layer.weight") in inner else k
        changed = not torch.equal(inner[key], v)
        assert changed == (train_norms and "norm" in k), k


def test_merged_export_equals_the_adapted_model(tmp_path):
    model = apply_lora(tiny_llama(V, num_layers=2, seed=0), r=4, alpha=16, dropout=0.1, train_norms=True)
    train_steps(model)
    x = ids(7)
    with torch.no_grad():
        adapted = model(input_ids=x).logits
    plain = plain_student(model)
    assert not is_lora(plain) and type(plain).__name__ == "LlamaForCausalLM"
    assert not any("lora" in k for k in plain.state_dict())
    plain.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, adapted, rtol=1e-5, atol=1e-5)


def untied_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))


def test_lm_head_adapter_with_a_fused_method_is_refused():
    with pytest.raises(KDistillError, match="fused head"):
        apply_lora(untied_llama(), target_modules=["q_proj", "lm_head"], fused_head=True)
    # without the fused head an untied LM head may carry an adapter, and the merge is exact
    model = apply_lora(untied_llama(), target_modules=["lm_head"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
        x = ids(1)
        adapted = model(input_ids=x).logits
        torch.testing.assert_close(plain_student(model)(input_ids=x).logits, adapted, rtol=1e-5, atol=1e-5)
    # the fused forward refuses it too, should such a model reach it
    model = apply_lora(untied_llama(), target_modules=["lm_head"])
    with pytest.raises(KDistillError, match="LoRA adapter"):
        fused_student_output(model, {"input_ids": ids(), "attention_mask": torch.ones(2, 10, dtype=torch.long)})


def test_fused_forward_sees_the_adapters():
    model = apply_lora(tiny_llama(V, num_layers=2, seed=0), r=4, target_modules="all-linear")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    x = ids(2)
    out = fused_student_output(model, {"input_ids": x, "attention_mask": torch.ones_like(x)})
    with torch.no_grad():
        torch.testing.assert_close(out.extra["hidden"] @ out.extra["lm_head_weight"].T, model(input_ids=x).logits,
                                   rtol=1e-4, atol=1e-4)


def test_refusals():
    with pytest.raises(KDistillError, match="ties the two"):
        apply_lora(tiny_llama(V, num_layers=1), target_modules=["embed_tokens"])
    with pytest.raises(KDistillError, match="Did you mean 'q_proj'"):
        apply_lora(tiny_llama(V, num_layers=1), target_modules=["q_prj"])
    with pytest.raises(KDistillError, match="r: got 0"):
        apply_lora(tiny_llama(V, num_layers=1), r=0)
    with pytest.raises(KDistillError, match="smaller_config"):
        build_lm_student(tiny_llama(V, num_layers=2), kind="smaller_config", config={"num_hidden_layers": 1},
                         lora={"r": 2})


def test_lora_on_a_pruned_student():
    teacher = tiny_llama(V, num_layers=3, seed=0)
    calib = [{"input_ids": ids(3), "attention_mask": torch.ones(2, 10, dtype=torch.long)}]
    student, tok = build_lm_student(teacher, kind="pruned", prune={"heads": 2, "num_layers": 2}, calibration=calib,
                                    lora={"r": 2, "alpha": 4.0, "target_modules": ["o_proj"]})
    assert tok is None and is_lora(student)
    assert student.get_base_model().config.num_attention_heads == 2
    with pytest.raises(KDistillError, match="calibration"):
        build_lm_student(teacher, kind="pruned", prune={"heads": 2})


def test_export_refuses_an_adapter_only_folder(tmp_path):
    from kdistill.exporters.lm import export_lm

    apply_lora(tiny_llama(V, num_layers=1), r=2).save_pretrained(tmp_path / "adapters")  # peft: adapters only
    with pytest.raises(KDistillError, match="LoRA adapters only"):
        export_lm(tmp_path / "adapters", tmp_path / "out")
