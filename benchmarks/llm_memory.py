"""Peak memory of a token-level KD loss over a large vocabulary: naive vs chunked vs fused.

Prints one JSON object::

    {"vocab", "tokens", "naive_peak_mb", "chunked_peak_mb", "fused_peak_mb",
     "max_abs_diff_loss", "max_abs_diff_grad", ...}

What is measured. The loss is ``masked_mean(forward_kl(student_logits, teacher_logits, kd_temperature=2))``
with ``student_logits = hidden @ lm_head.T`` (hidden size 576 as in SmolLM2-135M), followed by
``backward()`` to ``hidden`` and ``lm_head``; the teacher logits are an fp32 ``(tokens, vocab)`` input.

* autograd: full student logits, then the textbook composition ``KL(log_softmax(t/T), log_softmax(s/T))``
           under autograd (what one writes without a custom loss; every intermediate is kept);
* naive:   full student logits, then kdistill's ``forward_kl`` unchunked (an autograd Function that, with
           a frozen teacher, saves only the ``(tokens, vocab)`` student gradient);
* chunked: full student logits, then ``chunked(forward_kl, chunk)`` (the loss never holds more than one
           chunk of fp32 intermediates);
* fused:   ``fused_linear_loss(forward_kl, hidden, lm_head, teacher_logits)`` (student logits are built
           chunk by chunk as well).

How peak memory is measured. Each variant runs in its own fresh subprocess (so allocator caches and
earlier peaks cannot leak between variants). After the inputs are built, the child resets the kernel's
resident-set high-water mark (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and records ``VmRSS``;
after the forward and backward passes it reads ``VmHWM``. ``*_peak_mb`` = ``VmHWM - VmRSS_before``: the
extra resident memory the loss and its backward needed on top of the inputs (which are identical for all
three). tracemalloc cannot see torch's allocations; the RSS high-water mark sees everything. Large
tensors are mmapped by glibc and returned to the OS when freed (the children run with
``MALLOC_MMAP_THRESHOLD_=1048576`` so this holds for every tensor >= 1 MiB), so RSS follows tensor
lifetimes closely. Before the measurement each child runs the same variant once on tiny inputs, so that
library code pages and thread pools are already resident and are not counted.
``inputs_mb`` reports the (excluded) input size.

Correctness: every child saves its loss and its gradients; differences are the maximum absolute
difference of autograd, chunked and fused against naive.

Usage: ``python benchmarks/llm_memory.py [--vocab 49152] [--tokens 4096] [--hidden 576] [--chunk 256]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("autograd", "naive", "chunked", "fused")


def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def child(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    from kdistill.losses.chunked import chunked, fused_linear_loss
    from kdistill.losses.logits import forward_kl, kl_from_log_probs, log_probs
    from kdistill.losses.reduce import masked_mean

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    g = torch.Generator().manual_seed(0)
    N, V, H = args.tokens, args.vocab, args.hidden
    hidden = (torch.randn(N, H, generator=g)).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * H ** -0.5).requires_grad_(True)
    teacher = torch.randn(N, V, generator=g) * 2.0
    mask = torch.rand(N, generator=g) > 0.1
    inputs_mb = (hidden.numel() + weight.numel() + teacher.numel()) * 4 / 2**20

    def run(hidden, weight, teacher, mask):
        if args.variant == "autograd":  # the textbook composition, autograd keeps every intermediate
            per_token = kl_from_log_probs(log_probs(teacher, 2.0), log_probs(F.linear(hidden, weight), 2.0))
        elif args.variant == "naive":
            per_token = forward_kl(F.linear(hidden, weight), teacher, kd_temperature=2.0)
        elif args.variant == "chunked":
            per_token = chunked(forward_kl, args.chunk)(F.linear(hidden, weight), teacher, kd_temperature=2.0)
        else:
            per_token = fused_linear_loss(forward_kl, hidden, weight, teacher, kd_temperature=2.0,
                                          chunk_size=args.chunk)
        loss = masked_mean(per_token, mask)
        loss.backward()
        return loss

    # warm-up on tiny inputs: pages in the code paths and thread pools, so the measured increase is the
    # memory of the computation itself (without it every variant shows the same ~240 MB of library pages)
    w_h = hidden[:8].detach().clone().requires_grad_(True)
    w_w = weight[:512].detach().clone().requires_grad_(True)
    run(w_h, w_w, teacher[:8, :512], mask[:8])
    del w_h, w_w

    Path("/proc/self/clear_refs").write_text("5")     # reset the RSS high-water mark
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    loss = run(hidden, weight, teacher, mask)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    torch.save({"loss": loss.detach(), "grad_hidden": hidden.grad, "grad_weight": weight.grad}, args.out)
    print(json.dumps({"peak_mb": (peak - before) / 1024, "inputs_mb": inputs_mb, "seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        child(args)
        return
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("llm_memory.py needs Linux /proc/self/clear_refs to reset the RSS high-water mark.")

    import torch

    results, tensors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in VARIANTS:
            out = os.path.join(tmp, f"{v}.pt")
            cmd = [sys.executable, __file__, "--variant", v, "--out", out, "--vocab", str(args.vocab),
                   "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--chunk", str(args.chunk)]
            # fixed glibc mmap threshold: every tensor >= 1 MiB is its own mapping, returned to the OS when
            # freed, so RSS follows live tensors (glibc's dynamic threshold would keep chunk-sized buffers in
            # the heap and let a variant's peak depend on allocation history)
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                sys.exit(f"variant {v} failed:\n{res.stderr}")
            results[v] = json.loads(res.stdout.strip().splitlines()[-1])
            tensors[v] = torch.load(out)
    ref = tensors["naive"]
    others = ("autograd", "chunked", "fused")
    d_loss = max(float((tensors[v]["loss"] - ref["loss"]).abs()) for v in others)
    d_grad = max(float((tensors[v][k] - ref[k]).abs().max()) for v in others for k in ("grad_hidden", "grad_weight"))
    naive = results["naive"]["peak_mb"]
    print(json.dumps({
        "vocab": args.vocab, "tokens": args.tokens,
        "autograd_peak_mb": round(results["autograd"]["peak_mb"], 1),
        "naive_peak_mb": round(naive, 1),
        "chunked_peak_mb": round(results["chunked"]["peak_mb"], 1),
        "fused_peak_mb": round(results["fused"]["peak_mb"], 1),
        "max_abs_diff_loss": d_loss, "max_abs_diff_grad": d_grad,
        "chunked_ratio": round(results["chunked"]["peak_mb"] / naive, 3),
        "fused_ratio": round(results["fused"]["peak_mb"] / naive, 3),
        "fused_vs_autograd": round(results["fused"]["peak_mb"] / results["autograd"]["peak_mb"], 3),
        "inputs_mb": round(results["naive"]["inputs_mb"], 1), "hidden": args.hidden, "chunk": args.chunk,
        "seconds": {v: round(results[v]["seconds"], 2) for v in VARIANTS},
        "method": "per-variant subprocess; VmHWM after clear_refs minus VmRSS after inputs",
    }))


if __name__ == "__main__":
    main()
