"""The device check: what kdistill does on a CUDA GPU, as one JSON document.

1. the GPU-marked tests (``pytest -m gpu``): every LLM divergence, the top-k and fused losses equal their CPU
   values and gradients on the GPU, the infinite-divergence error, fp16 / bf16 training and the tiny LLM recipe;
2. step cost of the forward-KL distillation loss at a SmolLM2-sized vocabulary (V = 49,152, hidden 576) over
   ``--tokens`` tokens, forward + backward, fp32 master values: the textbook loss (full student logits), the
   chunked loss and the fused loss (student logits never materialised), and the top-32 cached loss: median
   milliseconds of ``--repeats`` timed runs after warm-up and the peak GPU memory of one step.

    python benchmarks/device_check.py --out device_check.json     # ~2 minutes on one H100/H200

Prints the JSON (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from kdistill.losses.chunked import chunked, fused_linear_loss  # noqa: E402
from kdistill.losses.logits import forward_kl  # noqa: E402
from kdistill.losses.topk import teacher_topk, topk_loss  # noqa: E402


def gpu_tests() -> dict:
    t0 = time.perf_counter()
    files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").rglob("test_*.py")
                   if "mark.gpu" in f.read_text())  # only these: the rest need CPU-only extras
    r = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-rfs", *files],
                       cwd=ROOT, capture_output=True, text=True)
    tail = (r.stdout + r.stderr).strip().splitlines()
    summary = next((ln for ln in reversed(tail) if re.search(r"\d+ (passed|failed|skipped)", ln)
                    and not ln.startswith(("SKIPPED", "FAILED", "ERROR"))), "")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    return {"files": files, "returncode": r.returncode, "counts": counts, "seconds": round(time.perf_counter() - t0, 1),
            "failures": [ln for ln in tail if ln.startswith(("FAILED", "ERROR"))][:20]}


def step_cost(tokens: int, vocab: int, hidden: int, repeats: int) -> dict:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    h = (torch.randn(tokens, hidden, device=dev, generator=g)).requires_grad_(True)
    w = (torch.randn(vocab, hidden, device=dev, generator=g) * 0.05).requires_grad_(True)
    teacher = torch.randn(tokens, vocab, device=dev, generator=g) * 2
    lp, idx, res = teacher_topk(teacher, k=32, kd_temperature=2.0)

    variants = {
        "textbook": lambda: forward_kl(h @ w.T, teacher, kd_temperature=2.0),
        "chunked_1024": lambda: chunked(forward_kl, 1024)(h @ w.T, teacher, kd_temperature=2.0),
        "fused_1024": lambda: fused_linear_loss(forward_kl, h, w, teacher, chunk_size=1024, kd_temperature=2.0),
        "topk32_cached": lambda: topk_loss(h @ w.T, lp, idx, res, kd_temperature=2.0),
    }
    out = {}
    for name, fn in variants.items():
        for _ in range(3):  # warm-up
            fn().mean().backward()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times = []
        for _ in range(repeats):
            h.grad = w.grad = None
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn().mean().backward()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        out[name] = {"ms": round(statistics.median(times), 3),
                     "peak_extra_mb": round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)}
    # the variants compute the same loss: their gradients agree
    grads = {}
    for name, fn in variants.items():
        if name == "topk32_cached":
            continue
        h.grad = w.grad = None
        fn().mean().backward()
        grads[name] = h.grad.clone()
    ref = grads["textbook"]
    out["max_rel_grad_diff_vs_textbook"] = {
        k: float((v - ref).abs().max() / ref.abs().max()) for k, v in grads.items() if k != "textbook"}
    return out


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("device_check: no CUDA device; this script measures the GPU paths.")
    report = {
        "benchmark": "device_check", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "python": platform.python_version(), "tests": gpu_tests(),
        "forward_kl_step": {"tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden,
                            **step_cost(args.tokens, args.vocab, args.hidden, args.repeats)},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return report


if __name__ == "__main__":
    main()
