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
round, in a new random order each round (so slow drifts of a shared CPU, and whatever one measurement leaves
behind for the next, hit all of them alike), and the median over rounds is reported.

``--peers`` adds ``trl_step_ms``: one optimizer step of TRL's ``GKDTrainer`` (``trl.experimental.gkd``;
``pip install trl``, an optional benchmark dependency) on the same pair, batch and tokens, with
``lmbda = 0`` (no student generation: the same off-policy setting as ``kd_step``), ``beta = 0``, AdamW,
no gradient accumulation, dropout off. Each round runs ``trainer.train()`` for one step after the round's
kdistill measurements, and a ``TrainerCallback`` times the step from ``on_step_begin`` to ``on_step_end``
(forward, loss, backward, optimizer and scheduler step; data collation happens before ``on_step_begin``
and is not counted). ``trl_ratio = trl_step / (student_step + teacher_forward)`` is the same limit as
``overhead_ratio``.

Ratios: each ratio is computed within each round (all terms measured within about a second of each other)
and the median over rounds is reported; ``*_of_medians`` gives the ratio of the per-measurement medians. A
shared CPU switches between faster and slower phases during a run; the per-round ratio compares terms
measured in the same phase, the ratio of medians can mix phases.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--show-rounds", action="store_true", help="also print every round's times (to stderr)")
    ap.add_argument("--peers", action="store_true", help="also time TRL's GKDTrainer (needs `pip install trl`)")
    args = ap.parse_args()
    trl_step = make_trl_step(args) if args.peers else None

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
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=True)
    teacher = LlamaForCausalLM(tcfg).eval().requires_grad_(False)
    scfg = LlamaConfig(vocab_size=V, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=True)
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
    if trl_step is not None:
        trl_step(teacher, student, batch)  # warm-up
        times["trl_step_ms"] = []
    order_rng = random.Random(0)
    for _ in range(args.rounds):
        # a fresh random order each round: whatever one measurement leaves behind (allocator state, caches,
        # TRL's trainer bookkeeping) precedes every other measurement equally often
        names = list(fns) + (["trl_step_ms"] if trl_step is not None else [])
        order_rng.shuffle(names)
        for k in names:
            if k == "trl_step_ms":
                times[k].append(trl_step(teacher, student, batch))
                continue
            t = time.perf_counter()
            fns[k]()
            times[k].append((time.perf_counter() - t) * 1e3)
    if args.show_rounds:  # on stderr: stdout stays one JSON object
        print(json.dumps({k: [round(x, 1) for x in v] for k, v in times.items()}), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {k: round(v, 2) for k, v in med.items()}

    def ratios(num: str, den: tuple[str, ...]) -> tuple[float, float]:
        """(ratio of the medians, median of the per-round ratios)."""
        per_round = [times[num][r] / sum(times[d][r] for d in den) for r in range(args.rounds)]
        return med[num] / sum(med[d] for d in den), statistics.median(per_round)

    pairs = {"overhead_ratio": ("kd_step_ms", ("student_step_ms", "teacher_forward_ms")),
             "cached_ratio": ("cached_step_ms", ("student_step_ms",))}
    if trl_step is not None:
        pairs["trl_ratio"] = ("trl_step_ms", ("student_step_ms", "teacher_forward_ms"))
    for name, (num, den) in pairs.items():
        of_medians, paired = ratios(num, den)
        out[name] = round(paired, 4)
        out[name + "_of_medians"] = round(of_medians, 4)
    if trl_step is not None:
        import trl

        out["trl_version"] = trl.__version__
    out.update({"tokens_per_step": args.batch * args.length, "vocab": V, "rounds": args.rounds,
                "teacher_params": sum(p.numel() for p in teacher.parameters()),
                "student_params": sum(p.numel() for p in student.parameters()),
                "threads": torch.get_num_threads()})
    print(json.dumps(out))


def make_trl_step(args):
    """A function ``(teacher, student, batch) -> ms`` that runs one GKDTrainer step on ``batch``."""
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError as e:
        raise SystemExit(f"--peers needs TRL's GKDTrainer ({e}); install it with `pip install trl`.") from e
    import tempfile

    from datasets import Dataset
    from transformers import TrainerCallback

    from kdistill.teachers.tiny import train_tokenizer

    # GKDTrainer only reads the tokenizer's pad id (for generation, unused at lmbda = 0)
    tokenizer = train_tokenizer(["in the beginning was the word"] * 4, vocab_size=300)
    out_dir = tempfile.mkdtemp(prefix="kdistill_trl_")

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.ms: list[float] = []
            self.t0 = 0.0

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.ms.append((time.perf_counter() - self.t0) * 1e3)

    state: dict = {}

    def step(teacher, student, batch) -> float:
        if "trainer" not in state:
            n = batch["input_ids"].shape[0]
            rows = Dataset.from_dict({"row": list(range(n))})
            fixed = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                     "labels": batch["input_ids"].clone()}  # GKDTrainer shifts labels itself
            cfg = GKDConfig(output_dir=out_dir, per_device_train_batch_size=n, gradient_accumulation_steps=1,
                            max_steps=1, lmbda=0.0, beta=0.0, temperature=2.0, learning_rate=1e-5,
                            lr_scheduler_type="constant", logging_steps=10_000, save_strategy="no", report_to=[],
                            use_cpu=True, bf16=False, fp16=False, disable_dropout=True, dataloader_num_workers=0,
                            disable_tqdm=True, max_length=batch["input_ids"].shape[1])
            timer = StepTimer()
            state["timer"] = timer
            state["trainer"] = GKDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=rows,
                                          data_collator=lambda _rows: dict(fixed), processing_class=tokenizer,
                                          callbacks=[timer])
        state["trainer"].train()
        return state["timer"].ms[-1]

    return step


if __name__ == "__main__":
    main()
