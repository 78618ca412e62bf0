"""Step time of LLM distillation on CPU: is the KD step just "teacher forward + student step"?

Prints one JSON object::

    {"student_step_ms", "teacher_forward_ms", "kd_step_ms", "cached_step_ms", "overhead_ratio", "cached_ratio",
     "onpolicy_step_ms", "generation_share", ...}

* ``student_step_ms``: student forward + cross-entropy + backward + AdamW step (no teacher);
* ``teacher_forward_ms``: teacher forward under ``no_grad``;
* ``kd_step_ms``: what ``kdistill.train.loop.fit`` does per micro-batch with ``llm_kd`` (forward KL,
  ``kd_temperature`` 2): teacher forward (no_grad) + ``DistillStep`` (student forward + method) + backward
  + AdamW step;
* ``kd_fused_step_ms``: the same step with ``llm_kd(fused=True)`` as the ``llm`` task runs it: neither model's
  ``(tokens, V)`` logits are built; the loss takes both models' final hidden states and LM heads and builds the
  logits chunk by chunk (one chunk at these sizes), forming the student gradient in its forward;
* ``cached_step_ms``: the same from cached top-32 teacher targets (fp16 log-probs, int indices, residual),
  the teacher never runs;
* ``overhead_ratio = kd_step / (student_step + teacher_forward)`` (target <= 1.05; ``fused_overhead_ratio``
  the same for ``kd_fused_step``) and
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

On-policy (GKD, ``lmbda = 1``): ``onpolicy_step_ms`` is one micro-batch of ``gkd`` as the ``llm`` task runs it:
the student samples ``length - prompt_length`` new tokens from the batch's first ``prompt_length`` tokens (one
``generate`` call for the batch, KV cache on, sampling temperature 1, EOS not stopping so every step generates the
same number of tokens), the teacher scores the sequences, then the student forward + generalised JSD (``beta``
0.5) + backward + AdamW step. ``generation_share`` is the median over rounds of the share of that step spent in
``generate`` (the ``generation_seconds`` the method reports; a training run writes the same ratio to
``metrics.jsonl`` as ``generation_share``). With ``--peers``, ``trl_onpolicy_step_ms`` is one step of TRL's
``GKDTrainer`` at the same ``lmbda = 1``, ``beta``, pair, batch, prompt and generation lengths and temperature
(same timing callback as ``trl_step_ms``). When TRL cannot be imported, ``--peers`` reports
``trl_unavailable`` with the reason instead of the ``trl_*`` figures.

``--device cuda --dtype bfloat16`` runs the same measurements on a GPU with both models' weights in bf16 (AdamW on
bf16 weights; each timed call ends with ``torch.cuda.synchronize()``; ``generation_ms`` is what the method reports,
timed without a synchronize). ``--peers`` is CPU only.

``--pair smollm2`` replaces the synthetic pair by the zoo's SmolLM2-135M teacher and a 6-layer layer-subset
student built from it (``kdistill.students.llm.build_lm_student``), same measurements (slow on a CPU).

Ratios: each ratio is computed within each round (all terms measured within about a second of each other)
and the median over rounds is reported; ``*_of_medians`` gives the ratio of the per-measurement medians. A
shared CPU switches between faster and slower phases during a run; the per-round ratio compares terms
measured in the same phase, the ratio of medians can mix phases.
"""

from __future__ import annotations

import argparse
import contextlib
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
    ap.add_argument("--prompt-length", type=int, default=None,
                    help="on-policy row: prompt tokens (default length // 2; the rest is generated)")
    ap.add_argument("--pair", choices=("synthetic", "smollm2"), default="synthetic",
                    help="synthetic random Llamas (default) or SmolLM2-135M -> its 6-layer subset (zoo, slow)")
    ap.add_argument("--peers", action="store_true", help="also time TRL's GKDTrainer (needs `pip install trl`)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="both models' weights")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.peers and device.type != "cpu":
        raise SystemExit("--peers: TRL's GKDTrainer is timed on the CPU only; drop --peers or use --device cpu.")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    P = args.prompt_length if args.prompt_length is not None else args.length // 2
    if not 1 <= P < args.length:
        raise SystemExit(f"--prompt-length: got {P}, expected 1 <= prompt length < --length ({args.length}).")
    new = args.length - P
    trl_step = trl_onpolicy = None
    trl_unavailable = None
    if args.peers:
        trl_unavailable = trl_import_error()
        if trl_unavailable is None:
            trl_step = make_trl_step(args, lmbda=0.0)
            trl_onpolicy = make_trl_step(args, lmbda=1.0, prompt_length=P)

    from kdistill.data.lm import lm_tensors
    from kdistill.losses.logits import cross_entropy
    from kdistill.losses.reduce import masked_mean
    from kdistill.losses.topk import teacher_topk
    from kdistill.methods.base import ModelOutput
    from kdistill.methods.gkd import GKD
    from kdistill.methods.llm_kd import LLMKD
    from kdistill.students.llm import fused_student_output
    from kdistill.teachers.lm import fused_head_output
    from kdistill.train.loop import DistillStep

    torch.manual_seed(0)
    teacher, student = make_pair(args.pair)
    teacher.to(device=device, dtype=dtype).eval().requires_grad_(False)
    student.to(device=device, dtype=dtype)
    student.train()
    V = int(teacher.config.vocab_size)
    # every on-policy step generates exactly `new` tokens (kdistill: no eos_id; TRL: no EOS in the generation config)
    student.generation_config.eos_token_id = None
    ids = torch.randint(3, V, (args.batch, args.length)).to(device)
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

    def update(module, b, t_out):  # one optimizer step of a DistillStep on batch b against the teacher's output
        sum(module(b, t_out).values()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def kd_step():
        with torch.no_grad():
            t_out = ModelOutput(fwd(teacher, batch))
        update(kd_step_mod, batch, t_out)

    kd_fused_mod = DistillStep(student, LLMKD(loss="forward_kl", kd_temperature=2.0, fused=True),
                               fused_student_output)

    def kd_fused_step():
        with torch.no_grad():
            t_out = fused_head_output(teacher, batch)
        update(kd_fused_mod, batch, t_out)

    def cached_step():
        update(kd_step_mod, batch, ModelOutput(None, extra=cached))

    gkd = GKD(lmbda=1.0, beta=0.5, kd_temperature=1.0, sampling_temperature=1.0, max_new_tokens=new, seed=0)
    onpolicy_mod = DistillStep(student, gkd, fwd)
    prompt_batch = {k: v.to(device) for k, v in lm_tensors(ids, prompt_length=P).items()}
    generation_ms: list[float] = []

    def onpolicy_step():
        b = gkd.prepare_batch(student, prompt_batch)  # student samples the continuation (one generate call)
        with torch.no_grad():
            t_out = ModelOutput(fwd(teacher, b))
        update(onpolicy_mod, b, t_out)
        generation_ms.append(gkd.pop_metrics()["generation_seconds"] * 1e3)

    fns = {"student_step_ms": student_step, "teacher_forward_ms": teacher_forward, "kd_step_ms": kd_step,
           "kd_fused_step_ms": kd_fused_step, "cached_step_ms": cached_step, "onpolicy_step_ms": onpolicy_step}
    peers = {k: f for k, f in (("trl_step_ms", trl_step), ("trl_onpolicy_step_ms", trl_onpolicy)) if f is not None}
    for fn in fns.values():  # warm-up
        fn()
    sync()
    for fn in peers.values():
        fn(teacher, student, batch)
    generation_ms.clear()
    times: dict[str, list[float]] = {k: [] for k in (*fns, *peers)}
    order_rng = random.Random(0)
    for _ in range(args.rounds):
        # a fresh random order each round: whatever one measurement leaves behind (allocator state, caches,
        # TRL's trainer bookkeeping) precedes every other measurement equally often
        names = list(fns) + list(peers)
        order_rng.shuffle(names)
        for k in names:
            if k in peers:
                times[k].append(peers[k](teacher, student, batch))
                continue
            t = time.perf_counter()
            fns[k]()
            sync()
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
             "fused_overhead_ratio": ("kd_fused_step_ms", ("student_step_ms", "teacher_forward_ms")),
             "cached_ratio": ("cached_step_ms", ("student_step_ms",))}
    if trl_step is not None:
        pairs["trl_ratio"] = ("trl_step_ms", ("student_step_ms", "teacher_forward_ms"))
    for name, (num, den) in pairs.items():
        of_medians, paired = ratios(num, den)
        out[name] = round(paired, 4)
        out[name + "_of_medians"] = round(of_medians, 4)
    out["generation_ms"] = round(statistics.median(generation_ms), 2)
    out["generation_share"] = round(statistics.median(g / s for g, s in zip(generation_ms,
                                                                           times["onpolicy_step_ms"])), 4)
    if trl_onpolicy is not None:
        out["trl_onpolicy_ratio"] = round(statistics.median(
            t / k for t, k in zip(times["trl_onpolicy_step_ms"], times["onpolicy_step_ms"])), 4)
    if trl_unavailable is not None:
        out["trl_unavailable"] = trl_unavailable
    elif args.peers:
        import trl

        out["trl_version"] = trl.__version__
    out.update({"pair": args.pair, "device": str(device), "dtype": args.dtype, "prompt_tokens": P, "new_tokens": new,
                "tokens_per_step": args.batch * args.length, "vocab": V, "rounds": args.rounds,
                "teacher_params": sum(p.numel() for p in teacher.parameters()),
                "student_params": sum(p.numel() for p in student.parameters()),
                "threads": torch.get_num_threads()})
    print(json.dumps(out))


def make_pair(pair: str):
    """``(teacher, student)``: random Llamas (vocabulary 8192), or SmolLM2-135M and its 6-layer subset."""
    if pair == "smollm2":
        from kdistill.students.llm import build_lm_student
        from kdistill.teachers.lm import load_lm_teacher

        teacher, _ = load_lm_teacher("smollm2-135m")
        return teacher, build_lm_student(teacher, kind="layer_subset", num_layers=6)[0]
    from transformers import LlamaConfig, LlamaForCausalLM

    V = 8192
    tcfg = LlamaConfig(vocab_size=V, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=True)
    teacher = LlamaForCausalLM(tcfg)
    scfg = LlamaConfig(vocab_size=V, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=True)
    return teacher, LlamaForCausalLM(scfg)


def trl_import_error() -> str | None:
    """None when TRL's GKDTrainer imports, else why not (reported as ``trl_unavailable``)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: F401
    except ImportError as e:
        return f"{type(e).__name__}: {e} (install it with `pip install trl`; a benchmark-only dependency)"
    return None


def make_trl_step(args, *, lmbda: float, prompt_length: int | None = None):
    """A function ``(teacher, student, batch) -> ms`` that runs one GKDTrainer step on ``batch``: off-policy at
    ``lmbda = 0``; at ``lmbda = 1`` the student continues the first ``prompt_length`` tokens of each row for the
    rest of the row's length (sampling temperature 1, ``beta`` 0.5, as kdistill's on-policy row)."""
    import tempfile

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from kdistill.teachers.tiny import train_tokenizer

    # GKDTrainer only reads the tokenizer's pad id (the pad of its generations; none are padded here)
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
            L = batch["input_ids"].shape[1]
            if lmbda > 0:  # what the on-policy branch reads: the prompts, left-padded (here: none padded)
                fixed["prompts"] = batch["input_ids"][:, :prompt_length]
                fixed["prompt_attention_mask"] = batch["attention_mask"][:, :prompt_length]
                kw = {"beta": 0.5, "temperature": 1.0, "max_new_tokens": L - prompt_length}
            else:
                kw = {"beta": 0.0, "temperature": 2.0}
            cfg = GKDConfig(output_dir=out_dir, per_device_train_batch_size=n, gradient_accumulation_steps=1,
                            max_steps=1, lmbda=lmbda, learning_rate=1e-5, **kw,
                            lr_scheduler_type="constant", logging_steps=10_000, save_strategy="no", report_to=[],
                            use_cpu=True, bf16=False, fp16=False, disable_dropout=True, dataloader_num_workers=0,
                            disable_tqdm=True, max_length=L)
            timer = StepTimer()
            state["timer"] = timer
            state["trainer"] = GKDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=rows,
                                          data_collator=lambda _rows: dict(fixed), processing_class=tokenizer,
                                          callbacks=[timer])
        with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its summary; stdout stays one JSON object
            state["trainer"].train()
        return state["timer"].ms[-1]

    return step


if __name__ == "__main__":
    main()
