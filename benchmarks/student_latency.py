"""Inference latency of saved causal-LM students, side by side in one process: a forward pass over a prompt and
greedy decoding with the KV cache, per token. Students of equal parameter counts can differ a lot here (depth is
sequential work), which a perplexity table does not show.

    python benchmarks/student_latency.py runs/a/student runs/b/student [--names a b] [--tokens 128]
        [--new-tokens 32] [--rounds 5] [--threads 2]

Models are timed in an interleaved order each round (a slow phase of a shared machine hits all of them), and the
median over rounds is reported. Prints one JSON object: ``{name: {"params", "layers", "hidden",
"forward_ms" (batch 1 x --tokens), "decode_ms_per_token" (batch 1, --new-tokens after a 16-token prompt)}}`` plus
the settings.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", help="folders written by save_pretrained (a run's student/)")
    ap.add_argument("--names", nargs="+", help="one label per model (default: the folder names)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.names and len(args.names) != len(args.models):
        raise SystemExit(f"--names: got {len(args.names)} names for {len(args.models)} models; expected one each.")
    import torch
    import transformers as tr

    from kdistill.eval.metrics import latency_ms

    torch.set_num_threads(args.threads)
    names = args.names or args.models
    models = {n: tr.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
              for n, p in zip(names, args.models)}
    g = torch.Generator().manual_seed(0)
    vocab = min(m.config.vocab_size for m in models.values())
    ids = torch.randint(0, vocab, (1, args.tokens), generator=g)
    prompt = ids[:, :16]
    fwd: dict[str, list[float]] = {n: [] for n in models}
    dec: dict[str, list[float]] = {n: [] for n in models}
    rng = random.Random(0)
    with torch.inference_mode():
        for m in models.values():  # warm-up
            m(ids)
            m.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        for _ in range(args.rounds):
            order = list(models)
            rng.shuffle(order)
            for n in order:  # one timed call per model and round (kdistill's timer), models interleaved
                m = models[n]
                fwd[n].append(latency_ms(lambda: m(ids), repeats=1, warmup=0))
                dec[n].append(latency_ms(lambda: m.generate(prompt, max_new_tokens=args.new_tokens,
                                                            min_new_tokens=args.new_tokens, do_sample=False),
                                         repeats=1, warmup=0) / args.new_tokens)
    out = {n: {"params": sum(p.numel() for p in m.parameters()), "layers": m.config.num_hidden_layers,
               "hidden": m.config.hidden_size, "forward_ms": round(statistics.median(fwd[n]), 1),
               "decode_ms_per_token": round(statistics.median(dec[n]), 2)} for n, m in models.items()}
    out["settings"] = {"tokens": args.tokens, "new_tokens": args.new_tokens, "rounds": args.rounds,
                       "threads": args.threads, "dtype": "float32", "batch": 1}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
