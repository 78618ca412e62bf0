"""Storage cost and accuracy of the offline LLM teacher cache: top-k targets vs sampled targets.

Prints one JSON line per cache written::

    {"mode", "k", "bytes_per_token", "rel_error_vs_full_kl", ...}

* ``mode: topk`` for each ``k`` in ``--ks`` (the k most likely teacher tokens + the residual mass), then
  ``mode: sampled`` at the same bytes per token (``k`` = the largest number of draws ``N`` whose cache is no larger
  than that top-k cache; ``matched_topk_k`` names it), then sampled at each ``N`` in ``--samples``.
* ``bytes_per_token``: bytes of the shard files on disk (targets, int32 input ids, safetensors headers) divided by
  the number of cached tokens. The manifest (a few hundred bytes per shard) is excluded.
* ``rel_error_vs_full_kl``: ``|mean_cache_KL - mean_full_KL| / mean_full_KL`` over all tokens, where ``full_KL`` =
  KL(teacher || student) on the full vocabulary (T = 1) and ``cache_KL`` is the estimate from the targets *read back
  from disk*: the coarsened (k + 1)-category KL of ``kdistill.losses.topk.topk_loss`` (a lower bound, biased), or
  ``kdistill.losses.topk.sampled_loss`` (unbiased: its error is noise that shrinks with the number of tokens).
* ``rel_bias`` / ``rel_std_per_token``: the bias and the per-token noise of the estimate, relative to the mean full
  KL. Top-k is deterministic (bias = its error, noise = the spread of its per-token gap); sampled draws
  ``--repeats`` more independent targets in memory (the same ``teacher_sample`` the writer calls) and reports
  ``|mean over repeats - full| / full`` and the per-token standard deviation of ``estimate - full``.

Teacher / student: SmolLM2-135M-Instruct (zoo ``smollm2-135m``) and its 6-of-30-layer copy (the student
of ``recipes/llm/smollm2_kjv.yaml`` at initialisation) on the first KJV verses, ``--sequences`` x
``--length`` tokens. ``--synthetic`` uses a random 4-layer tiny Llama teacher and its 2-layer copy
instead (no packages needed; random models give flat distributions, a much harder case for top-k).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--ks", default="8,32,128", help="top-k sizes; each also gets a sampled cache of its size")
    ap.add_argument("--samples", default="32", help="more sampled caches at these draws per token ('' for none)")
    ap.add_argument("--repeats", type=int, default=16, help="independent sampled targets for bias and noise")
    args = ap.parse_args()

    from kdistill.data.lm import pack_blocks, tokenize_texts
    from kdistill.losses.logits import forward_kl
    from kdistill.losses.topk import sample_weights, sampled_loss, teacher_sample, topk_loss
    from kdistill.students.llm import layer_subset_copy
    from kdistill.teachers.cache import TopKCache, model_fingerprint, tokenizer_hash, write_topk_cache

    t0 = time.perf_counter()
    if args.synthetic:
        from kdistill.teachers.tiny import tiny_llama, train_tokenizer

        texts = ["In the beginning God created the heaven and the earth."] * 200
        tok = train_tokenizer(texts, vocab_size=512)
        teacher = tiny_llama(len(tok), num_layers=4, seed=0)
        student = layer_subset_copy(teacher, num_layers=2)
        setup = "synthetic tiny Llama 4 -> 2 layers"
    else:
        from kdistill.data.text import kjv_verses
        from kdistill.teachers.lm import load_causal_lm

        teacher, tok = load_causal_lm("smollm2-135m")
        student = layer_subset_copy(teacher, num_layers=6)
        texts = [v[3] for v in kjv_verses()[:2000]]
        setup = "SmolLM2-135M teacher -> 6-layer copy (untrained), KJV"
    blocks = pack_blocks(tokenize_texts(tok, texts), args.length, eos_id=tok.eos_token_id, max_blocks=args.sequences)
    with torch.no_grad():
        t_logits = torch.cat([teacher(input_ids=blocks[i:i + 4]).logits for i in range(0, len(blocks), 4)])
        s_logits = torch.cat([student(input_ids=blocks[i:i + 4]).logits for i in range(0, len(blocks), 4)])
    full = forward_kl(s_logits, t_logits)
    full_mean = float(full.mean())
    lookup = {tuple(b.tolist()): i for i, b in enumerate(blocks)}

    def teacher_fn(ids, attn):
        return torch.stack([t_logits[lookup[tuple(r.tolist())]] for r in ids])

    V = int(t_logits.shape[-1])
    common = dict(kd_temperature=1.0, teacher_fingerprint=model_fingerprint(teacher),
                  tokenizer_hash=tokenizer_hash(tok), vocab_size=V, shard_size=4, batch_size=4)

    def emit(mode: str, k: int, estimate: torch.Tensor, bpt: float, bias: float, noise: float, **more) -> None:
        print(json.dumps({"mode": mode, "k": k, "bytes_per_token": round(bpt, 2),
                          "rel_error_vs_full_kl": abs(float(estimate.mean()) - full_mean) / full_mean,
                          "rel_bias": bias, "rel_std_per_token": noise, **more, "full_kl": full_mean,
                          "cache_kl": float(estimate.mean()), "vocab": V, "tokens": int(blocks.numel()),
                          "setup": setup, "seconds": round(time.perf_counter() - t0, 1)}), flush=True)

    def read_back(mode: str, k: int) -> tuple[torch.Tensor, float]:
        with tempfile.TemporaryDirectory() as d:
            write_topk_cache(d, teacher_fn, blocks.tolist(), k=k, mode=mode, **common)
            cache = TopKCache(d)
            batch = cache.collate(list(cache))
            if mode == "topk":
                est = topk_loss(s_logits, batch["topk_logprobs"], batch["topk_indices"], batch["log_residual"])
            else:
                est = sampled_loss(s_logits, batch["sample_indices"], batch["sample_weights"], batch["teacher_entropy"])
            return est, cache.bytes_per_token()

    gen = torch.Generator().manual_seed(1)

    def draw(n: int) -> tuple[torch.Tensor, ...]:
        return teacher_sample(t_logits, samples=n, generator=gen)

    id_bytes = 2 if V <= 65536 else 4

    def sampled_bytes(n: int) -> float:
        """Bytes per token of a sampled cache without headers: input id, entropy (fp16), count of distinct ids and
        (id, count) per distinct id."""
        distinct = (draw(n)[1] > 0).sum(-1).float().mean()
        return 4 + 2 + 1 + (id_bytes + 1) * float(distinct)

    def sampled_row(n: int, **more) -> None:
        est, bpt = read_back("sampled", n)
        reps = []
        for _ in range(args.repeats):
            ids, counts, _, ent = draw(n)
            reps.append(sampled_loss(s_logits, ids, sample_weights(counts), ent))
        reps_t = torch.stack(reps) if reps else est.unsqueeze(0)
        bias = abs(float(reps_t.mean()) - full_mean) / full_mean
        noise = float((reps_t - full).std()) / full_mean
        emit("sampled", n, est, bpt, bias, noise, repeats=args.repeats, **more)

    ks = [int(x) for x in args.ks.split(",") if x]
    for k in ks:
        est, bpt = read_back("topk", k)
        gap = (est - full) / full_mean
        emit("topk", k, est, bpt, abs(float(gap.mean())), float(gap.std()))
        header = bpt - (4 + (id_bytes + 2) * k + 4)  # safetensors headers per token, as in this top-k cache
        lo, hi = 1, 255
        if sampled_bytes(1) + header > bpt:
            continue
        while lo < hi:  # the most draws whose cache fits in the top-k cache's bytes
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if sampled_bytes(mid) + header <= bpt else (lo, mid - 1)
        sampled_row(lo, matched_topk_k=k)
    for n in [int(x) for x in args.samples.split(",") if x]:
        sampled_row(n)


if __name__ == "__main__":
    main()
