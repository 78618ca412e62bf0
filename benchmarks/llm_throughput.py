"""Step time of LLM distillation on CPU: is the KD step just "teacher forward + student step"?

Prints one JSON object::

    {"student_step_ms", "teacher_forward_ms", "kd_step_ms", "cached_step_ms", "overhead_ratio", "cached_ratio", ...}

* ``student_step_ms``: student forward + cross-entropy + backward + AdamW step (no teacher);
* ``teacher_forward_ms``: teacher forward under ``no_grad``;
* ``kd_step_ms``: what ``kdistill.train.loop.fit`` does per micro-batch with ``llm_kd`` (forward KL,
  ``kd_temperature`` 2): teacher forward (no_grad) + ``DistillStep`` (student forward + method) + backward
  + AdamW step;
* ``cached_step_ms``: the same from cached top-32 teacher targets (fp16 log-probs, int indices, residual),
  the teacher never runs;
* ``overhead_ratio = kd_step / (student_step + teacher_forward)`` (target <= 1.05) and
  ``cached_ratio = cached_step / student_step`` (target <= 1.15).

The pair is a Llama-style teacher (hidden 256, 6 layers, vocabulary 8192) and a smaller student (hidden
128, 2 layers, same vocabulary), batch 8 x 128 tokens. The four measurements are interleaved round by
round (so slow drifts of a shared CPU hit all of them alike) and the median over rounds is reported.
The ``--peers`` comparison with TRL's ``GKDTrainer`` asked for in issue 4 is not implemented yet (TRL is
not installed here, and an unverified code path is worse than none).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from kdistill.losses.logits import cross_entropy
    from kdistill.losses.reduce import masked_mean
    from kdistill.losses.topk import teacher_topk
    from kdistill.methods.base import ModelOutput
    from kdistill.methods.llm_kd import LLMKD
    from kdistill.train.loop import DistillStep

    V = 8192
    torch.manual_seed(0)
    tcfg = LlamaConfig(vocab_size=V, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    teacher = LlamaForCausalLM(tcfg).eval().requires_grad_(False)
    scfg = LlamaConfig(vocab_size=V, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    student = LlamaForCausalLM(scfg).train()
    ids = torch.randint(0, V, (args.batch, args.length))
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "mask": labels != -100}
    with torch.no_grad():
        lp, idx, res = teacher_topk(teacher(input_ids=ids).logits, k=32, kd_temperature=2.0)
    cached = {"topk_logprobs": lp.half(), "topk_indices": idx.to(torch.int32).long(), "log_residual": res,
              "kd_temperature": 2.0}
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)

    def fwd(model, b):
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    kd_step_mod = DistillStep(student, LLMKD(loss="forward_kl", kd_temperature=2.0), fwd)

    def student_step():
        loss = masked_mean(cross_entropy(fwd(student, batch), batch["labels"]), batch["mask"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def teacher_forward():
        with torch.no_grad():
            return fwd(teacher, batch)

    def kd_step():
        with torch.no_grad():
            t_out = ModelOutput(fwd(teacher, batch))
        total = sum(kd_step_mod(batch, t_out).values())
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def cached_step():
        t_out = ModelOutput(None, extra=cached)
        total = sum(kd_step_mod(batch, t_out).values())
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    fns = {"student_step_ms": student_step, "teacher_forward_ms": teacher_forward, "kd_step_ms": kd_step,
           "cached_step_ms": cached_step}
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {k: round(v, 2) for k, v in med.items()}
    out["overhead_ratio"] = round(med["kd_step_ms"] / (med["student_step_ms"] + med["teacher_forward_ms"]), 4)
    out["cached_ratio"] = round(med["cached_step_ms"] / med["student_step_ms"], 4)
    out.update({"tokens_per_step": args.batch * args.length, "vocab": V, "rounds": args.rounds,
                "teacher_params": sum(p.numel() for p in teacher.parameters()),
                "student_params": sum(p.numel() for p in student.parameters()),
                "threads": torch.get_num_threads()})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
