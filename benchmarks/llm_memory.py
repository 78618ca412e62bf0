"""Peak memory and time of a token-level KD loss over a large vocabulary: eager vs chunked vs fused heads.

Sweeps ``--vocab`` x ``--tokens`` (default V in {49,152; 131,072; 262,144} x tokens in {512; 2,048; 8,192}) and
appends one JSON object per (vocab, tokens) row to ``--out`` (default ``docs/llm_memory.jsonl``)::

    {"vocab", "tokens", "hidden", "naive_peak_mb", "fused_peak_mb", "naive_ms", "fused_ms",
     "max_abs_diff_loss", "max_abs_diff_grad", "chunked_peak_mb", "fused_student_peak_mb", ...}

Rows already in ``--out`` (same vocab, tokens, hidden, loss, dtype, device) are skipped, so an interrupted sweep
resumes where it stopped; ``--fresh`` measures them again and replaces them. Pick rows with ``--vocab 49152
--tokens 512`` (several values each are a grid). The full sweep takes hours on a small CPU box; run it in the
background (``nohup python benchmarks/llm_memory.py &``). By :func:`estimate_gb`, the eager variants (``autograd``,
``naive``, ``chunked``) need 17-58 GB at 8,192 tokens and V >= 131,072, so a 24 GB machine skips them there (see
the memory guard below) and measures the fused ones only.

What is measured. Inputs, identical for every variant: the student's final hidden states ``(tokens, H)`` and LM
head ``(V, H)`` (both trained), the teacher's hidden states and LM head (frozen), a token mask. ``hidden`` is 576
at V = 49,152 (SmolLM2's head) and 2,048 at the larger vocabularies (``--hidden`` overrides). The loss is
``masked_mean(D(student_logits, teacher_logits))`` with ``D = --loss`` (forward KL at ``kd_temperature`` 2),
then ``backward()`` to the student's hidden states and head:

* ``autograd``: both logits in full, the textbook composition ``KL(log_softmax(t/T), log_softmax(s/T))`` under
  autograd (every intermediate kept);
* ``naive``: both logits in full, kdistill's divergence (blocked analytic gradient, saves one ``(tokens, V)``
  gradient): the eager loss;
* ``chunked``: both logits in full, ``chunked(D, chunk)``;
* ``fused_student``: the teacher's logits in full, the student's built chunk by chunk (``fused_linear_loss`` with
  teacher logits);
* ``fused``: neither model's logits exist (``fused_linear_loss`` with ``teacher_hidden`` / ``teacher_weight``).

Both fused variants pass ``grad_hint=mask`` (what ``llm_kd`` passes), so the gradient is formed in the forward
pass. ``chunk`` is :func:`kdistill.losses.chunked.fused_chunk_size` of the sizes unless ``--chunk`` is given: one
chunk while the ``(tokens, V)`` fp32 logits take <= 512 MiB, else equal chunks of <= 256 MiB / (16 V) rows (on
``--device cuda``: equal chunks of <= 4 GiB / (16 V) rows).

How peak memory is measured (CPU). Each variant runs in its own fresh subprocess (allocator caches and earlier
peaks cannot leak between variants). After the inputs are built, the child resets the kernel's resident-set
high-water mark (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and records ``VmRSS``; after the runs it reads
``VmHWM``. ``*_peak_mb`` = ``VmHWM - VmRSS_before``: the memory the loss, its backward and the gradients it
returns (the ``(V, H)`` weight gradient included) needed on top of the inputs. The children run with
``MALLOC_MMAP_THRESHOLD_=1048576`` so every tensor >= 1 MiB is its own mapping, returned to the OS when freed,
and RSS follows tensor lifetimes. Before measuring, each child runs its variant once on tiny inputs so library
code pages and thread pools are resident already. On CUDA (``--device cuda``) the peak is
``torch.cuda.max_memory_allocated`` above the allocation after the inputs.

Time (``*_ms``): one more subprocess runs every variant that fits, in a random order each round, for ``--rounds``
rounds after a warm-up, and reports each variant's best forward + backward time; ``fused_vs_naive_time`` is the
median over rounds of the paired ratio ``fused / naive`` (paired within a round, so a slow phase of a shared
machine hits both). The memory children run their variant once.
``--chunk-sweep C1 C2 ...`` also times the fused variant at each chunk size in that process and rounds (row field
``fused_by_chunk``: ``{chunk: {"ms", "peak_mb"}}``, peaks on CUDA only), to choose the chunk rule per device.

Memory guard: a variant whose estimated need exceeds ``--max-gb`` (default 80% of MemAvailable at start) is not
run; the row records it in ``skipped`` with the estimate, and its fields are null. Differences
(``max_abs_diff_*``) are against ``naive``, or against the first variant that ran (``diff_reference``).
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

VARIANTS = ("autograd", "naive", "chunked", "fused_student", "fused")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "llm_memory.jsonl"


def default_hidden(vocab: int) -> int:
    """576 (SmolLM2-135M) at V <= 65,536, else 2,048 (Llama-3.2-1B class heads)."""
    return 576 if vocab <= 65_536 else 2048


def estimate_gb(variant: str, tokens: int, vocab: int, hidden: int, chunk: int, dtype_bytes: int) -> float:
    """Rough peak above the inputs: ``(tokens, V)`` fp32 tensors alive at once, the weight gradient and a chunk."""
    full = tokens * vocab * 4
    grad_w = vocab * hidden * dtype_bytes
    chunk_b = 4 * chunk * vocab * 4
    need = {"autograd": 7 * full, "naive": 4 * full, "chunked": 4 * full, "fused_student": full + chunk_b,
            "fused": chunk_b}[variant] + grad_w + 2 * tokens * hidden * 4
    return need / 2**30


def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def _mem_available_gb() -> float:
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M).group(1)) / 2**20


def _setup(args: argparse.Namespace):
    """Inputs and a ``run(variant, hidden, weight, t_hidden, t_weight, mask) -> loss`` for one (vocab, tokens)."""
    import torch
    import torch.nn.functional as F

    from kdistill.losses import logits as L
    from kdistill.losses.chunked import chunked, fused_linear_loss
    from kdistill.losses.reduce import masked_mean

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    dev = torch.device(args.device)
    dt = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    N, V, H = args.tokens[0], args.vocab[0], args.hidden
    hidden = torch.randn(N, H, generator=g).to(dev, dt).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * H ** -0.5).to(dev, dt).requires_grad_(True)
    t_hidden = torch.randn(N, H, generator=g).to(dev, dt)
    t_weight = (torch.randn(V, H, generator=g) * 2.0 * H ** -0.5).to(dev, dt)
    mask = (torch.rand(N, generator=g) > 0.1).to(dev)
    fn = getattr(L, args.loss)
    kd = {"kd_temperature": 2.0}

    def run(v, hidden, weight, t_hidden, t_weight, mask):
        if v == "fused" or v.startswith("fused@"):  # fused@C: the fused variant with chunk C (--chunk-sweep)
            chunk = int(v.partition("@")[2] or args.chunk)
            per_token = fused_linear_loss(fn, hidden, weight, teacher_hidden=t_hidden, teacher_weight=t_weight,
                                          chunk_size=chunk, grad_hint=mask, **kd)
        else:
            with torch.no_grad():
                teacher = F.linear(t_hidden, t_weight)
            if v == "fused_student":
                per_token = fused_linear_loss(fn, hidden, weight, teacher, chunk_size=args.chunk, grad_hint=mask,
                                              **kd)
            elif v == "autograd":  # the textbook composition, autograd keeps every intermediate
                per_token = L.kl_from_log_probs(L.log_probs(teacher, 2.0), L.log_probs(F.linear(hidden, weight), 2.0))
            elif v == "naive":
                per_token = fn(F.linear(hidden, weight), teacher, **kd)
            else:
                per_token = chunked(fn, args.chunk)(F.linear(hidden, weight), teacher, **kd)
            del teacher
        loss = masked_mean(per_token, mask)
        loss.backward()
        return loss.detach()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def warm_up(v):
        # tiny inputs: pages in the code paths and thread pools (else every variant shows the same ~240 MB of
        # library pages on CPU)
        w = [x[:8].detach().clone().requires_grad_(x.requires_grad) for x in (hidden, t_hidden)]
        ww = [x[:512].detach().clone().requires_grad_(x.requires_grad) for x in (weight, t_weight)]
        run(v, w[0], ww[0], w[1], ww[1], mask[:8])
        sync()

    inputs = (hidden, weight, t_hidden, t_weight, mask)
    inputs_mb = sum(x.numel() * x.element_size() for x in inputs[:4]) / 2**20
    return inputs, inputs_mb, run, warm_up, sync


def child(args: argparse.Namespace) -> None:
    """One variant, once: peak memory above the inputs, its loss and gradients (saved to ``--out``)."""
    import torch

    inputs, inputs_mb, run, warm_up, sync = _setup(args)
    hidden, weight = inputs[:2]
    dev = hidden.device
    warm_up(args.variant)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")     # reset the RSS high-water mark
        before = _status_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    loss = run(args.variant, *inputs)
    sync()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else _status_kb("VmHWM") * 1024
    torch.save({"loss": loss.cpu(), "grad_hidden": hidden.grad.cpu(), "grad_weight": weight.grad.cpu()}, args.out)
    print(json.dumps({"peak_mb": (peak - before) / 2**20, "inputs_mb": inputs_mb, "once_ms": seconds * 1e3}))


def timing_child(args: argparse.Namespace) -> None:
    """Every variant of ``--variants``, in a random order each round: best time per variant and the per-round
    ratios ``fused / naive``."""
    import random
    import statistics

    import torch

    inputs, _, run, warm_up, sync = _setup(args)
    hidden, weight = inputs[:2]
    cuda = hidden.device.type == "cuda"
    variants = list(args.variants) + [f"fused@{c}" for c in args.chunk_sweep]
    for v in variants:
        warm_up(v)
    times: dict[str, list[float]] = {v: [] for v in variants}
    peaks: dict[str, float] = {}  # CUDA only: max_memory_allocated above the inputs, per variant
    ratios = []
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = list(variants)
        rng.shuffle(order)
        this = {}
        for v in order:
            hidden.grad = weight.grad = None
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            run(v, *inputs)
            sync()
            this[v] = time.perf_counter() - t0
            times[v].append(this[v])
            if cuda:
                peaks[v] = max(peaks.get(v, 0.0), (torch.cuda.max_memory_allocated() - before) / 2**20)
        if "fused" in this and "naive" in this:
            ratios.append(this["fused"] / this["naive"])
    print(json.dumps({"ms": {v: min(t) * 1e3 for v, t in times.items()}, "peak_mb": peaks,
                      "fused_vs_naive_time": statistics.median(ratios) if ratios else None}))


def measure_row(vocab: int, tokens: int, hidden: int, args: argparse.Namespace) -> dict:
    import torch

    from kdistill.losses.chunked import fused_chunk_size

    chunk = args.chunk or fused_chunk_size(tokens, vocab, device=args.device)
    dtype_bytes = 2 if args.dtype in ("bfloat16", "float16") else 4
    results, skipped, failed = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in args.variants:
            if v == "autograd" and args.loss != "forward_kl":
                skipped[v] = "the textbook composition is written for forward_kl only"
                continue
            need = estimate_gb(v, tokens, vocab, hidden, chunk, dtype_bytes)
            if need > args.max_gb:
                skipped[v] = f"needs ~{need:.1f} GB above the inputs, more than --max-gb {args.max_gb:.1f}"
                continue
            out = os.path.join(tmp, f"{v}.pt")
            cmd = [sys.executable, __file__, "--variant", v, "--out", out, "--vocab", str(vocab), "--tokens",
                   str(tokens), "--hidden", str(hidden), "--chunk", str(chunk), "--loss", args.loss,
                   "--dtype", args.dtype, "--device", args.device]
            # fixed glibc mmap threshold: every tensor >= 1 MiB is its own mapping, returned to the OS when freed,
            # so RSS follows live tensors (glibc's dynamic threshold would keep chunk-sized buffers in the heap)
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                failed[v] = f"exit {res.returncode}: {' | '.join(res.stderr.strip().splitlines()[-3:])}"
                continue
            results[v] = json.loads(res.stdout.strip().splitlines()[-1])
            results[v]["file"] = out
        timing = {"ms": {}, "fused_vs_naive_time": None}
        if results and args.rounds > 0:
            cmd = [sys.executable, __file__, "--timing", "--variants", *results, "--vocab", str(vocab), "--tokens",
                   str(tokens), "--hidden", str(hidden), "--chunk", str(chunk), "--loss", args.loss, "--dtype",
                   args.dtype, "--device", args.device, "--rounds", str(args.rounds)]
            if args.chunk_sweep:
                cmd += ["--chunk-sweep", *map(str, args.chunk_sweep)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                failed["timing"] = f"exit {res.returncode}: {' | '.join(res.stderr.strip().splitlines()[-3:])}"
            else:
                timing = json.loads(res.stdout.strip().splitlines()[-1])
        ref_name = "naive" if "naive" in results else next(iter(results), None)
        d_loss = d_grad = None
        if ref_name is not None:
            ref = torch.load(results[ref_name]["file"])
            others = [v for v in results if v != ref_name]
            d_loss = d_grad = 0.0
            for v in others:  # one variant's gradients in memory at a time beside the reference
                got = torch.load(results[v]["file"])
                d_loss = max(d_loss, float((got["loss"].float() - ref["loss"].float()).abs()))
                d_grad = max(d_grad, *(float((got[k].float() - ref[k].float()).abs().max())
                                       for k in ("grad_hidden", "grad_weight")))
                del got
            if not others:
                d_loss = d_grad = None

    def field(v: str, key: str) -> float | None:
        return round(results[v][key], 1) if v in results else None

    def ms(v: str) -> float | None:
        return round(timing["ms"][v], 1) if v in timing["ms"] else None

    row = {"vocab": vocab, "tokens": tokens, "hidden": hidden, "loss": args.loss, "dtype": args.dtype,
           "device": args.device, "chunk": chunk}
    for v in VARIANTS:
        if v in args.variants:
            row[f"{v}_peak_mb"] = field(v, "peak_mb")
            row[f"{v}_ms"] = ms(v)
    row.update(max_abs_diff_loss=d_loss, max_abs_diff_grad=d_grad, diff_reference=ref_name,
               inputs_mb=round(next(iter(results.values()))["inputs_mb"], 1) if results else None)
    if "naive" in results and "fused" in results:
        row["fused_vs_naive_peak"] = round(results["fused"]["peak_mb"] / results["naive"]["peak_mb"], 3)
    if timing["fused_vs_naive_time"] is not None:
        row["fused_vs_naive_time"] = round(timing["fused_vs_naive_time"], 3)
    if args.chunk_sweep and timing["ms"]:
        # the fused variant at other chunk sizes, timed in the same process and rounds as the row's variants
        # (peaks on CUDA only: there max_memory_allocated is exact in one process)
        row["fused_by_chunk"] = {str(c): {"ms": ms(f"fused@{c}"),
                                          "peak_mb": (round(timing["peak_mb"][f"fused@{c}"], 1)
                                                      if f"fused@{c}" in timing.get("peak_mb", {}) else None)}
                                 for c in args.chunk_sweep}
    if failed:
        row["failed"] = failed
    row.update(skipped=skipped, threads=os.cpu_count(), rounds=args.rounds,
               method="per-variant subprocess; peak = VmHWM after clear_refs minus VmRSS after inputs (CPU) or "
                      "max_memory_allocated above the inputs (CUDA); ms = best of rounds, variants interleaved in "
                      "one process in a random order per round")
    return row


def _key(row: dict) -> tuple:
    return (row["vocab"], row["tokens"], row["hidden"], row.get("loss"), row.get("dtype"), row.get("device"))


def table(rows: list[dict]) -> str:
    """The eager (``naive``) and fused peaks and times of every row, sorted by vocabulary and tokens; ``—`` where a
    variant was not run (the row's ``skipped`` says why) or not timed."""
    def cell(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    lines = ["| V | tokens | hidden | eager peak MB | fused peak MB | fused / eager peak | eager ms | fused ms | "
             "fused / eager time | max abs diff (grad) |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["vocab"], r["tokens"])):
        lines.append(f"| {r['vocab']:,} | {r['tokens']:,} | {r['hidden']:,} | {cell(r.get('naive_peak_mb'), ',.1f')} | "
                     f"{cell(r.get('fused_peak_mb'), ',.1f')} | {cell(r.get('fused_vs_naive_peak'), '.3f')} | "
                     f"{cell(r.get('naive_ms'), ',.0f')} | {cell(r.get('fused_ms'), ',.0f')} | "
                     f"{cell(r.get('fused_vs_naive_time'), '.3f')} | {cell(r.get('max_abs_diff_grad'), '.1e')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[49152, 131072, 262144])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--hidden", type=int, default=None, help="default: 576 at V <= 65,536, else 2,048")
    ap.add_argument("--chunk", type=int, default=None, help="default: fused_chunk_size(tokens, vocab, device)")
    ap.add_argument("--chunk-sweep", type=int, nargs="+", default=[],
                    help="also time the fused variant with each of these chunk sizes (row field fused_by_chunk)")
    ap.add_argument("--loss", default="forward_kl")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds (0: no timing)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-gb", type=float, default=None, help="default: 80%% of MemAvailable at start")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON lines file; '-' prints only")
    ap.add_argument("--fresh", action="store_true", help="measure rows already in --out again and replace them")
    ap.add_argument("--table", action="store_true", help="print the rows of --out as a markdown table, run nothing")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.table:
        print(table([json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]))
        return
    if args.variant:
        child(args)
        return
    if args.timing:
        timing_child(args)
        return
    if args.device == "cpu" and not Path("/proc/self/clear_refs").exists():
        sys.exit("llm_memory.py needs Linux /proc/self/clear_refs to reset the RSS high-water mark.")
    if args.max_gb is None:
        args.max_gb = 0.8 * _mem_available_gb() if args.device == "cpu" else float("inf")
    out = None if args.out == "-" else Path(args.out)
    done = {}
    if out is not None and out.exists():
        done = {_key(r): r for r in map(json.loads, filter(str.strip, out.read_text().splitlines()))}
    for vocab in args.vocab:
        for tokens in args.tokens:
            hidden = args.hidden or default_hidden(vocab)
            key = (vocab, tokens, hidden, args.loss, args.dtype, args.device)
            if key in done and not args.fresh:
                print(f"[llm_memory] V={vocab} tokens={tokens} hidden={hidden}: already in {out}, skipped",
                      file=sys.stderr)
                continue
            row = measure_row(vocab, tokens, hidden, args)
            print(json.dumps(row), flush=True)
            if row.get("failed"):  # not recorded: a resumed sweep measures the row again
                print(f"[llm_memory] V={vocab} tokens={tokens}: variants failed, row not written", file=sys.stderr)
                continue
            if out is not None:
                from kdistill.io import write_bytes_atomic

                done[key] = row
                write_bytes_atomic(out, "".join(json.dumps(r) + "\n" for r in done.values()).encode())


if __name__ == "__main__":
    main()
