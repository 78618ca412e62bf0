"""Combine the steps of ``benchmarks/device_check.sh`` into its one JSON document.

    python benchmarks/device_check_report.py STEP_DIR [--out FILE]

``STEP_DIR`` holds, per step ``<name>`` (``device_check``, ``llm_throughput``, ``llm_memory``): ``<name>.rc`` ("exit
status, seconds"), ``<name>.out`` (its stdout), ``<name>.err`` (its stderr) and, for ``device_check``, the
``device_check.json`` it wrote. Prints ``{"device_check": {...}, "llm_throughput": {...}, "llm_memory": [rows],
"steps": {name: {"returncode", "seconds", "timed_out", "ok", "stderr_tail"}}, "ok": bool}``; exits 1 unless every step
ran to the end with results (and the GPU tests passed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STEPS = ("device_check", "llm_throughput", "llm_memory")


def json_lines(text: str) -> list[dict]:
    """The JSON objects among a step's stdout lines (warnings and progress lines are skipped)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def combine(step_dir: Path) -> dict:
    doc: dict = {}
    steps = {}
    for name in STEPS:
        rc_file = step_dir / f"{name}.rc"
        if not rc_file.is_file():  # the script stopped before this step
            doc[name] = None
            steps[name] = {"returncode": None, "seconds": None, "timed_out": False, "ok": False,
                           "stderr_tail": "not run"}
            continue
        rc, seconds = (int(x) for x in rc_file.read_text().split())
        out = step_dir / f"{name}.out"
        text = out.read_text() if out.is_file() else ""
        if name == "device_check":
            f = step_dir / "device_check.json"
            doc[name] = json.loads(f.read_text()) if f.is_file() else None
        elif name == "llm_throughput":
            rows = json_lines(text)
            doc[name] = rows[-1] if rows else None
        else:
            doc[name] = json_lines(text)
        tests_failed = name == "device_check" and bool(doc[name]) and doc[name]["tests"]["returncode"] != 0
        err = step_dir / f"{name}.err"
        steps[name] = {"returncode": rc, "seconds": seconds, "timed_out": rc in (124, 137),
                       "ok": rc == 0 and bool(doc[name]) and not tests_failed,
                       "stderr_tail": err.read_text()[-2000:] if rc and err.is_file() else ""}
    doc["steps"] = steps
    doc["ok"] = all(s["ok"] for s in steps.values())
    return doc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    doc = combine(args.step_dir)
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
