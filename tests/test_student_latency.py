"""benchmarks/student_latency.py on two tiny saved Llamas: one JSON object with both models' sizes and times."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _save(path, layers, hidden):
    import torch
    import transformers as tr

    torch.manual_seed(0)
    cfg = tr.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    tr.LlamaForCausalLM(cfg).save_pretrained(path)


def test_two_students_side_by_side(tmp_path):
    pytest.importorskip("transformers")
    _save(tmp_path / "deep", 4, 16)
    _save(tmp_path / "wide", 1, 32)
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "student_latency.py"), str(tmp_path / "deep"),
                        str(tmp_path / "wide"), "--names", "deep", "wide", "--tokens", "8", "--new-tokens", "2",
                        "--rounds", "1", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["deep"]["layers"] == 4 and out["wide"]["layers"] == 1 and out["wide"]["hidden"] == 32
    assert all(out[n]["forward_ms"] > 0 and out[n]["decode_ms_per_token"] > 0 for n in ("deep", "wide"))
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "student_latency.py"), str(tmp_path / "deep"),
                          "--names", "a", "b"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "one each" in bad.stderr
