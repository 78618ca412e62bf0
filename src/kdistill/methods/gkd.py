"""``gkd``: on-policy distillation of a causal LM (Generalized Knowledge Distillation).

Agarwal et al., 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"
(ICLR 2024). For each micro-batch of (prompt, continuation) sequences:

1. with probability ``lmbda`` the *student* samples the continuation itself (temperature
   ``sampling_temperature``); otherwise the dataset's continuation is kept (supervised KD);
2. the teacher scores the resulting sequence (teacher logits on the same tokens);
3. the loss is the generalised JSD on the continuation tokens only::

       L = T^2 * mean_{i in continuation} JSD_beta(p_teacher(. | y_<i) , p_student(. | y_<i); T)

   ``beta = 0`` is forward KL, ``beta = 1`` reverse KL (the paper's best on-policy setting uses
   ``beta = 0.5`` or ``1``).

Two temperatures, two names: ``sampling_temperature`` drives generation only and ``kd_temperature``
the loss only (TRL's ``GKDTrainer`` has one ``temperature`` for sampling while its loss silently stays
at 1.0). The coin of step 1 comes from a generator seeded with ``(seed, micro-batch counter)``, identical
on every rank, so all processes take the same branch (no rank waits in ``generate`` while another runs a
forward); the counter is a buffer of this module, so it is checkpointed and a resumed run draws the
same coins. Never cacheable: the targets depend on the current student.

Use when the student will generate long outputs (exposure bias matters) and the teacher can be run
during training. The loop calls :meth:`GKD.prepare_batch` through its ``augment`` hook (the ``llm`` task
wires it); batches carry ``input_ids``, ``attention_mask``, ``prompt_length`` (``(B,)``, one value for
the whole batch), ``labels`` and ``mask`` (see :mod:`kdistill.data.lm`).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from ..data.lm import IGNORE_INDEX, label_mask
from ..errors import KDistillError, expect
from ..losses.chunked import chunked
from ..losses.logits import generalized_jsd
from ..losses.reduce import kd_scale, masked_mean
from ..registry import METHODS
from .base import Method, ModelOutput, require_teacher


def continuation_batch(input_ids: Tensor, prompt_length: int, pad_id: int | None = None, *,
                       prompt_mask: Tensor | None = None, eos_id: int | None = None) -> dict[str, Tensor]:
    """Labels / mask for a (prompt + continuation) batch: position ``i`` predicts token ``i + 1`` and counts when
    that token belongs to the continuation. With ``eos_id`` the continuation ends at its first EOS (which counts:
    the student learns to stop) and what follows is padding; ``prompt_mask`` marks the real tokens of left-padded
    prompts. Without ``eos_id``, continuation tokens equal to ``pad_id`` do not count."""
    B, Lt = input_ids.shape
    P = int(prompt_length)
    attn = torch.ones_like(input_ids)
    if prompt_mask is not None:
        attn[:, :P] = prompt_mask.to(attn.dtype)
    if eos_id is not None:
        is_eos = (input_ids[:, P:] == eos_id).long()
        attn[:, P:] = ((is_eos.cumsum(1) - is_eos) == 0).long()  # up to and including the first EOS
    pos = torch.arange(Lt, device=input_ids.device).unsqueeze(0).expand(B, Lt)
    counts = (pos[:, :-1] >= P - 1) & (attn[:, 1:] == 1)
    if eos_id is None and pad_id is not None:
        counts &= input_ids[:, 1:] != pad_id
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(counts, input_ids[:, 1:], torch.full_like(labels[:, :-1], IGNORE_INDEX))
    return {"input_ids": input_ids, "attention_mask": attn, "labels": labels, "mask": label_mask(labels),
            "prompt_length": torch.full((B,), P, dtype=torch.long, device=input_ids.device)}


@METHODS.register("gkd")
class GKD(Method):
    """On-policy generalised-JSD distillation (see the module docstring for the formula)."""

    cacheable = False
    needs_prompts = True  # it generates continuations of the batch's prompts

    def __init__(self, lmbda: float = 0.5, beta: float = 0.5, kd_temperature: float = 1.0,
                 sampling_temperature: float = 1.0, max_new_tokens: int | None = None, seed: int = 0,
                 chunk_size: int = 0) -> None:
        super().__init__()
        expect(0.0 <= lmbda <= 1.0, "gkd lmbda", lmbda, "a probability in [0, 1] (share of on-policy batches)")
        expect(0.0 <= beta <= 1.0, "gkd beta", beta, "a number in [0, 1] (0 = forward KL, 1 = reverse KL)")
        expect(kd_temperature > 0, "gkd kd_temperature", kd_temperature, "a positive number")
        expect(sampling_temperature > 0, "gkd sampling_temperature", sampling_temperature,
               "a positive number (generation temperature)")
        expect(max_new_tokens is None or max_new_tokens >= 1, "gkd max_new_tokens", max_new_tokens,
               "None (= the length of the dataset's continuation) or an integer >= 1")
        expect(isinstance(chunk_size, int) and chunk_size >= 0, "gkd chunk_size", chunk_size, "an integer >= 0")
        self.lmbda, self.beta, self.kd_temperature = float(lmbda), float(beta), float(kd_temperature)
        self.sampling_temperature, self.max_new_tokens, self.seed = (float(sampling_temperature), max_new_tokens,
                                                                     int(seed))
        self.chunk_size = chunk_size
        self.register_buffer("coin_counter", torch.zeros((), dtype=torch.int64))

    def draw_coin(self) -> bool:
        """True = on-policy for this micro-batch. Same answer on every rank; advances the counter."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.coin_counter))
        self.coin_counter += 1
        return bool(torch.rand((), generator=g) < self.lmbda)

    @torch.no_grad()
    def prepare_batch(self, student: nn.Module, batch: dict[str, Any], *, pad_id: int | None = None,
                      eos_id: int | None = None) -> dict[str, Any]:
        """With probability ``lmbda`` replace the continuation by one sampled from ``student``."""
        if "prompt_length" not in batch:
            raise KDistillError("gkd: the batch has no 'prompt_length'; expected (prompt + continuation) batches "
                                "from the llm task's prompt data (data.prompt_tokens > 0).")
        on_policy = self.draw_coin() or not bool(batch["mask"].any())  # nothing to learn off-policy: generate
        self.log("on_policy", float(on_policy))
        # seconds spent generating since the loop last collected the metrics (one optimizer step: its micro-batches
        # add up); the loop writes it with its share of the step time, ``generation_share``
        spent = self._metrics.get("generation_seconds", 0.0)
        self.log("generation_seconds", spent)
        if not on_policy:
            return batch
        pl = batch["prompt_length"]
        if isinstance(pl, Tensor):
            if pl.numel() == 0 or bool((pl != pl.reshape(-1)[0]).any()):
                raise KDistillError(f"gkd: prompt_length differs within a batch ({pl.tolist()}); expected one prompt "
                                    "length per batch (the llm task's prompt data has fixed-length prompts).")
            pl = pl.reshape(-1)[0]
        P = int(pl)
        ids = batch["input_ids"]
        new = self.max_new_tokens or (ids.shape[1] - P)
        prompt = ids[:, :P]
        prompt_mask = batch["attention_mask"][:, :P] if "attention_mask" in batch else torch.ones_like(prompt)
        fill = pad_id if pad_id is not None else eos_id
        # left padding every row shares is cut before generating (prompt_tokens is an upper bound) and put back
        # after; the rest stays, with the attention mask (position ids follow it in Hugging Face's generate)
        real = prompt_mask.bool().any(0)
        k = int(real.long().argmax()) if bool(real.any()) else 0
        was = student.training
        student.eval()
        t0 = time.perf_counter()
        try:  # one generate call for the micro-batch, KV cache on; each row samples until its EOS (or ``new``
            # tokens): the student learns where to stop, not only what to say
            stop = {"eos_token_id": eos_id} if eos_id is not None else {"min_new_tokens": new}  # no EOS: full length
            gen = student.generate(input_ids=prompt[:, k:], attention_mask=prompt_mask[:, k:], do_sample=True,
                                   temperature=self.sampling_temperature, top_k=0, top_p=1.0, max_new_tokens=new,
                                   pad_token_id=fill, use_cache=True, **stop)
            if gen.device.type == "cuda":  # the clock measures the work, not its queueing
                torch.cuda.synchronize(gen.device)
        finally:
            student.train(was)
        self.log("generation_seconds", spent + time.perf_counter() - t0)
        gen = torch.cat([prompt[:, :k], gen], 1)
        if gen.shape[1] < P + new:  # every sequence stopped early: keep the batch's width
            gen = torch.cat([gen, gen.new_full((gen.shape[0], P + new - gen.shape[1]), int(fill or 0))], 1)
        out = dict(batch)
        out.update(continuation_batch(gen, P, pad_id, prompt_mask=prompt_mask, eos_id=eos_id))
        return out

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher = require_teacher("gkd", teacher)
        fn = chunked(generalized_jsd, self.chunk_size) if self.chunk_size else generalized_jsd
        per_token = fn(student.logits, teacher.logits, beta=self.beta, kd_temperature=self.kd_temperature)
        T = self.kd_temperature
        return {"gkd": kd_scale(T) * masked_mean(per_token, batch.get("mask"))}
