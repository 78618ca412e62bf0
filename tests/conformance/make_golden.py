"""Write ``golden.json``: the reference formulas of ``_reference.py`` evaluated in float64 on seeded inputs.

This script never calls kdistill: the golden values and gradients come from the independent reference
formulas only, so ``test_conformance.py`` can check both that kdistill matches them and that the reference
formulas still produce them (neither side can drift silently).

Regenerate (only when a case is added, or a reference formula is deliberately corrected -- say why in the
commit, since every stored number changes meaning)::

    .venv/bin/python tests/conformance/make_golden.py            # rewrites tests/conformance/golden.json
    .venv/bin/python tests/conformance/make_golden.py --check    # exit 1 if the stored file differs

Inputs are drawn once per case from ``torch.Generator().manual_seed(crc32(case name))`` in float32 and stored
in the JSON next to the results, so the tests never depend on the random number generator of the installed
torch version. Floats are written with ``repr`` (exact round trip).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _reference as R  # type: ignore[no-redef]
else:
    from . import _reference as R

GOLDEN = Path(__file__).resolve().parent / "golden.json"
FORMAT = 1


def _encode(x: torch.Tensor) -> dict:
    kind = "bool" if x.dtype == torch.bool else ("int64" if not x.is_floating_point() else "float")
    data = x.detach().flatten().tolist()
    return {"dtype": kind, "shape": list(x.shape), "data": data}


def _sanity(name: str, case: R.Case, inputs: list[torch.Tensor], value: torch.Tensor, grads: dict) -> None:
    """Checks that the inputs exercise what the case is meant to exercise."""
    assert torch.isfinite(value).all(), f"{name}: non-finite reference value"
    for i, g in grads.items():
        assert torch.isfinite(g).all(), f"{name}: non-finite reference gradient for input {i}"
    if case.family == "token_selective":
        sel = R.token_selection(inputs[0].double(), inputs[1].double(), kd_temperature=case.kwargs["kd_temperature"])
        assert bool(sel.any()) and not bool(sel.all()), f"{name}: needs both selected and unselected tokens"
    if case.family == "alpha_divergence_clipped":
        hit = R.alpha_importance_clipped(inputs[0].double(), inputs[1].double(), **case.kwargs)
        assert bool(hit.any()) and not bool(hit.all()), f"{name}: the clip must be active on some classes only"
    if case.family == "sinkhorn_distance":  # converged: twice the iterations change nothing
        more = R.sinkhorn_distance(inputs[0].double(), inputs[1].double(), **case.kwargs, iterations=800)
        assert torch.allclose(more, value, rtol=1e-12, atol=1e-14), f"{name}: Sinkhorn not converged"


def build() -> dict:
    cases = {}
    for name, case in R.CASES.items():
        g = torch.Generator().manual_seed(R.seed_of(name))
        inputs = case.build(g)
        value, grads = R.evaluate_reference(case, inputs)
        _sanity(name, case, inputs, value, grads)
        cases[name] = {
            "family": case.family,
            "kwargs": case.kwargs,
            "inputs": [_encode(x) for x in inputs],
            "value": _encode(value),
            "grads": {str(i): _encode(gr) for i, gr in grads.items()},
        }
    return {"format": FORMAT, "generated_by": "tests/conformance/make_golden.py", "torch": torch.__version__,
            "cases": cases}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the stored file instead of writing it")
    args = ap.parse_args()
    golden = build()
    if args.check:
        stored = json.loads(GOLDEN.read_text())

        def differs(n: str) -> bool:
            a, b = stored["cases"].get(n), golden["cases"][n]
            if a is None:
                return True
            pairs = [(a["value"], b["value"])] + [(a["grads"][i], b["grads"][i]) for i in b["grads"]]
            return any(x["shape"] != y["shape"] or not torch.allclose(torch.tensor(x["data"], dtype=torch.float64),
                                                                     torch.tensor(y["data"], dtype=torch.float64),
                                                                     rtol=1e-12, atol=1e-15) for x, y in pairs)

        bad = [n for n in golden["cases"] if differs(n)]
        missing = sorted(set(golden["cases"]) ^ set(stored["cases"]))
        for n in bad + missing:
            print("differs:", n)
        return 1 if bad or missing else 0
    # one case per line: a regenerated file diffs case by case
    head = {k: v for k, v in golden.items() if k != "cases"}
    lines = [json.dumps(head, allow_nan=False)[:-1] + ', "cases": {']
    names = list(golden["cases"])
    for i, name in enumerate(names):
        sep = "," if i < len(names) - 1 else ""
        lines.append(json.dumps(name) + ": " + json.dumps(golden["cases"][name], separators=(",", ":"),
                                                           allow_nan=False) + sep)
    lines.append("}}")
    text = "\n".join(lines) + "\n"
    GOLDEN.write_text(text)
    n_values = sum(math.prod(c["value"]["shape"]) for c in golden["cases"].values())
    print(f"wrote {GOLDEN} ({len(golden['cases'])} cases, {n_values} values, {len(text) // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
