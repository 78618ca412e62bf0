"""Run by tests/train/test_fsdp.py: LLM distillation with the fused LM-head loss under FSDP2 (2 CPU processes, the
shipped fsdp.yaml, KDISTILL_CPU_FSDP=1), or as one plain process for the
reference.

    python _fsdp_llm_worker.py OUT_DIR

A tiny Llama teacher (4 decoder layers) distils into a tiny Llama student (2 layers, tied embeddings) with llm_kd's
fused forward KL: both models hand over hidden states and LM head, neither's logits exist. Under FSDP the student is
sharded by Accelerate and the teacher's decoder layers by ``fit``; rank 0 writes the final student weights to
``OUT_DIR/weights.safetensors`` and what it saw (which tensors were sharded, and how) to ``OUT_DIR/info.json``.
"""

import json
import sys
from pathlib import Path

import torch
from _fsdp_worker import accelerator, full
from transformers import LlamaConfig, LlamaForCausalLM

from kdistill.data import TensorDictDataset, make_loader
from kdistill.data.lm import label_mask
from kdistill.io import save_state_dict_atomic
from kdistill.methods.llm_kd import LLMKD
from kdistill.students.llm import fused_student_output
from kdistill.teachers.lm import fused_head_output
from kdistill.train import end_distributed, fit

V, L = 96, 12


def llama(layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=layers == 2)
    return LlamaForCausalLM(cfg).float()


def main(out: Path) -> None:
    acc = accelerator()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (32, L), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((32, 1), -100)], dim=1)
    data = TensorDictDataset(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                             mask=label_mask(labels))
    teacher, student = llama(4, 1), llama(2, 2)
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    res = fit(student=student, method=LLMKD(loss="forward_kl", kd_temperature=2.0, fused=True), teacher=teacher,
              accelerator=acc, train_loader=make_loader(data, 8, seed=0), epochs=1, optimizer="adamw", lr=0.01,
              schedule="constant", progress=False, seed=0,
              student_forward=lambda m, b: fused_student_output(m, b),
              teacher_forward=lambda m, b: fused_head_output(m, b))
    from torch.distributed.tensor import DTensor

    def local_numel(module):
        return {k: v.to_local().numel() for k, v in module.state_dict().items() if isinstance(v, DTensor)}

    state = full(res.student)
    if acc.is_main_process:
        save_state_dict_atomic(out / "weights.safetensors", state)
        (out / "info.json").write_text(json.dumps({
            "world": acc.num_processes, "steps": res.steps,
            "teacher_sharded": local_numel(teacher),
            "teacher_full": {k: v.numel() for k, v in teacher.state_dict().items()},
            "teacher_head_is_plain": not isinstance(teacher.get_output_embeddings().weight, DTensor),
            "student_sharded": sorted(local_numel(student)),  # sharded in place; fit returns a whole copy
            "moved": max(float((state[k] - v).abs().max()) for k, v in initial.items())}))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    end_distributed(exit_code=0)
