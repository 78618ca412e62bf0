#!/usr/bin/env bash
# The device check in one command, for a CUDA machine (under 10 minutes on one H100; each step has a time limit, so
# a stuck step is reported, not waited for):
#   1. benchmarks/device_check.py: the GPU-marked tests (`pytest -m gpu`: every LLM divergence, the top-k and fused
#      losses equal to the eager ones in values and gradients, fp16 / bf16 training, the tiny LLM recipe) and the
#      forward-KL step cost at V = 49,152 over 4,096 tokens;
#   2. benchmarks/llm_throughput.py in bf16 on the GPU (batch 8 x 256 tokens, 5 rounds);
#   3. benchmarks/llm_memory.py in bf16 on the GPU, the issue's whole grid: V = 49,152 / 131,072 / 262,144 x
#      512 / 2,048 / 8,192 tokens, eager vs fused, and the fused loss at chunks of 256 / 1,024 / 4,096 rows.
# Prints one JSON document (benchmarks/device_check_report.py combines the steps): {"device_check": {...},
# "llm_throughput": {...}, "llm_memory": [rows], "steps": {name: {"returncode", "seconds", "timed_out", "ok",
# "stderr_tail"}}, "ok": bool}; exits 1 when a step failed.
#
#   bash benchmarks/device_check.sh [--out FILE]
#   bash benchmarks/device_check.sh --dry-run     # no GPU needed: the interpreter, the scripts and their flags exist
#
# Without a CUDA device it stops at once with exit status 2. PYTHON overrides the interpreter (default: the
# repository's .venv/bin/python, else python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3 || true)"; fi
fi
DRY=0
OUT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --out) [[ $# -ge 2 ]] || { echo "device_check.sh: --out needs a file name" >&2; exit 64; }; OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "device_check.sh: unknown argument '$1'; expected --dry-run, --out FILE or --help" >&2; exit 64 ;;
  esac
done
[[ -z "$OUT" ]] || OUT="$(realpath -m -- "$OUT")"  # before the cd below

# name | time limit (s) | script | arguments
STEPS=(
  "device_check|270|benchmarks/device_check.py|--tokens 4096 --repeats 5"
  "llm_throughput|120|benchmarks/llm_throughput.py|--device cuda --dtype bfloat16 --batch 8 --length 256 --rounds 5"
  "llm_memory|200|benchmarks/llm_memory.py|--device cuda --dtype bfloat16 --vocab 49152 131072 262144 --tokens 512 2048 8192 --variants naive fused --chunk-sweep 256 1024 4096 --rounds 5 --out -"
)

[[ -n "$PY" && -x "$(command -v "$PY")" ]] || { echo "device_check.sh: no Python interpreter found; set PYTHON=..." >&2; exit 2; }
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$ROOT"

if [[ $DRY -eq 1 ]]; then
  # every step's script exists and its --help lists every flag this file passes; pytest is installed
  status=0
  "$PY" -c "import pytest, torch" || { echo "device_check.sh: pytest and torch must import in $PY" >&2; exit 2; }
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit script args <<<"$step"
    [[ -f "$script" ]] || { echo "device_check.sh: $script is missing" >&2; status=1; continue; }
    help="$(timeout 120 "$PY" "$script" --help)" || { echo "device_check.sh: $script --help failed" >&2; status=1; continue; }
    for flag in $args; do
      if [[ "$flag" == --* ]] && ! grep -q -- "$flag" <<<"$help"; then
        echo "device_check.sh: $script has no flag $flag" >&2; status=1
      fi
    done
    echo "{\"dry_run\": \"$name\", \"command\": \"$PY $script $args\", \"time_limit_s\": $limit}"
  done
  [[ -f benchmarks/device_check_report.py ]] || { echo "device_check.sh: device_check_report.py is missing" >&2; status=1; }
  exit $status
fi

if ! timeout 120 "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "device_check.sh: no CUDA device (torch.cuda.is_available() is False in $PY); run it on a GPU machine." >&2
  exit 2
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit script args <<<"$step"
  extra=()
  [[ "$name" == device_check ]] && extra=(--out "$TMP/$name.json")
  start=$(date +%s)
  # shellcheck disable=SC2086  # $args is a list of flags
  set +e
  timeout --kill-after=10 "$limit" "$PY" "$script" $args "${extra[@]}" >"$TMP/$name.out" 2>"$TMP/$name.err"
  rc=$?
  set -e
  echo "$rc $(( $(date +%s) - start ))" >"$TMP/$name.rc"
  echo "device_check.sh: $name finished with status $rc" >&2
done

"$PY" benchmarks/device_check_report.py "$TMP" ${OUT:+--out "$OUT"}
