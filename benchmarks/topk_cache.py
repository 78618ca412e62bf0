"""Storage cost and accuracy of the offline top-k teacher cache.

Prints one JSON line per k in {8, 32, 128}::

    {"k", "bytes_per_token", "rel_error_vs_full_kl", ...}

* ``bytes_per_token``: bytes of the shard files on disk (fp16 log-probs, uint16 indices, fp32 log residual,
  int32 input ids, safetensors headers) divided by the number of cached tokens. The manifest (a few
  hundred bytes per shard) is excluded.
* ``rel_error_vs_full_kl``: ``|mean_topk_KL - mean_full_KL| / mean_full_KL`` over all tokens, where
  ``full_KL`` = KL(teacher || student) on the full vocabulary (T = 1) and ``topk_KL`` is the coarsened
  (k + 1)-category KL of ``kdistill.losses.topk`` computed from the targets *read back from disk*.

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
    ap.add_argument("--ks", default="8,32,128")
    args = ap.parse_args()

    from kdistill.data.lm import pack_blocks, tokenize_texts
    from kdistill.losses.logits import forward_kl
    from kdistill.losses.topk import topk_loss
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
    lookup = {tuple(b.tolist()): i for i, b in enumerate(blocks)}

    def teacher_fn(ids, attn):
        return torch.stack([t_logits[lookup[tuple(r.tolist())]] for r in ids])

    V = int(t_logits.shape[-1])
    for k in [int(x) for x in args.ks.split(",")]:
        with tempfile.TemporaryDirectory() as d:
            write_topk_cache(d, teacher_fn, blocks.tolist(), k=k, kd_temperature=1.0,
                             teacher_fingerprint=model_fingerprint(teacher), tokenizer_hash=tokenizer_hash(tok),
                             vocab_size=V, shard_size=4, batch_size=4)
            cache = TopKCache(d)
            batch = cache.collate(list(cache))
            approx = topk_loss(s_logits, batch["topk_logprobs"], batch["topk_indices"], batch["log_residual"])
            bpt = cache.bytes_on_disk() / cache.tokens()
        rel = float((approx.mean() - full.mean()).abs() / full.mean())
        print(json.dumps({"k": k, "bytes_per_token": round(bpt, 2), "rel_error_vs_full_kl": rel,
                          "full_kl": float(full.mean()), "topk_kl": float(approx.mean()), "vocab": V,
                          "tokens": int(blocks.numel()), "setup": setup,
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
